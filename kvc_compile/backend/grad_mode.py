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


def builds_backward(example_inputs: Sequence[object]) -> bool:
    """Whether AOTAutograd would trace a backward graph for these inputs in the current mode."""
    return torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in example_inputs
    )


def compile_for_inference(compile_graph: Callable[[], Callable]) -> Callable:
    """Compile under ``no_grad`` (an inference graph) and run every call under ``no_grad``."""
    warnings.warn(
        "kvc: the compiled model was called with gradients enabled; compressed forward passes are "
        "inference-only (no gradient flows through the cache selection), so this graph runs without "
        "autograd and its outputs do not require grad. Call it under torch.no_grad() or "
        "torch.inference_mode() to silence this.",
        InferenceOnlyWarning,
        stacklevel=2,
    )
    with torch.no_grad():
        compiled = compile_graph()

    def run(*args):
        with torch.no_grad():
            return compiled(*args)

    # Inductor's result may take its inputs boxed (one list, ``_boxed_call``): keep the convention.
    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run
