"""Compressed forward passes are inference: under grad mode they run, without gradients.

The kvc ops select entries (a top-k over scores) and have no autograd formulas, so AOTAutograd
cannot build a backward graph through them. Rather than fail when a user calls the compiled model
outside ``torch.no_grad()`` (the default in a script), the graph is compiled and run as an
inference graph: its outputs carry no gradient, and a warning says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch


class InferenceOnlyWarning(UserWarning):
    """A kvc-compiled call under grad mode ran without autograd: its outputs have no gradient."""


def builds_backward(gm: torch.nn.Module, example_inputs: Sequence[object]) -> bool:
    """Whether AOTAutograd would trace a backward graph for this graph in the current mode: a tensor
    that requires grad reaches it as an input, or as a parameter the graph holds itself (Dynamo
    lifts a model's parameters to inputs or keeps them as attributes, depending on how it traced)."""
    if not torch.is_grad_enabled():
        return False
    inputs = (value for value in example_inputs if isinstance(value, torch.Tensor))
    return any(tensor.requires_grad for tensor in (*inputs, *gm.parameters()))


def drop_grad_mode_switches(gm: torch.fx.GraphModule) -> None:
    """Remove the graph's own grad-mode switches: Dynamo records a ``torch.no_grad()`` region inside the
    model (transformers 5.17's rotary embedding has one) as a switch off and back *on*, which would
    make the rest of the graph need a backward again."""
    switches = [node for node in gm.graph.nodes
                if node.op == "call_function" and node.target in (torch._C._set_grad_enabled, torch.set_grad_enabled)]
    for node in switches:
        if not node.users:
            gm.graph.erase_node(node)
    if switches:
        gm.graph.lint()
        gm.recompile()


def compile_for_inference(gm: torch.fx.GraphModule, compile_graph: Callable[[], Callable]) -> Callable:
    """Compile ``gm`` under ``no_grad`` (an inference graph) and run every call under ``no_grad``."""
    warnings.warn(
        "kvc: the compiled model was called with gradients enabled; compressed forward passes are "
        "inference-only (no gradient flows through the cache selection), so this graph runs without "
        "autograd and its outputs do not require grad. Call it under torch.no_grad() or "
        "torch.inference_mode() to silence this.",
        InferenceOnlyWarning,
        stacklevel=2,
    )
    drop_grad_mode_switches(gm)
    with torch.no_grad():
        compiled = compile_graph()

    def run(*args):
        with torch.no_grad():
            return compiled(*args)

    # Inductor's result may take its inputs boxed (one list, ``_boxed_call``): keep the convention.
    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run
