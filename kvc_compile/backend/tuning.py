"""Decode graphs compiled to stream the weights: Inductor's max-autotune with frozen weights.

A decode step multiplies a few rows by every weight matrix, so its time is the time to read the
weights. On the CPU, MKL's GEMM at these shapes reads them at about a third of the memory bandwidth
(``benchmarks/results/bench-smollm2-decode-b8-cpu.md``). With the weights frozen as constants,
max-autotune can pick Inductor's own CPU GEMM template, which packs each weight once at compile time
and then streams it near the bandwidth (``benchmarks/decode_gemm_cpu.py``).

Inductor freezes only weights that are attributes of the graph, and Dynamo makes them attributes only
when ``freezing`` is set while it traces, which a backend cannot do (it is handed the traced graph).
So ``compile_tuned`` turns the graph's parameter inputs into attributes itself, compiles the rest, and
passes the remaining inputs through.

The price, and why it is an option (``options={"tune_decode": True}``) rather than the default:
compiling takes minutes longer (every GEMM shape is benchmarked), the frozen graph holds its own
packed copy of the weights (one more copy in memory), and weights changed in place after compiling
are not seen by it, or only in part (compile again). Only decode graphs are tuned: a prefill's GEMMs
have many rows, where MKL is fast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch._inductor.config
from torch import fx

# Inductor settings of a tuned decode graph: frozen weights let the CPU GEMM template pack them.
DECODE_TUNING = {"freezing": True, "max_autotune": True}
# The timings of every autotuned GEMM, which Inductor writes to stderr, are left out (settings of the
# torch versions that have them).
DECODE_TUNING |= {name: value for name, value in (("autotune_num_choices_displayed", 0),
                                                   ("max_autotune_report_choices_stats", False))
                  if hasattr(torch._inductor.config, name)}


def parameters_as_attributes(gm: fx.GraphModule, example_inputs: Sequence[object]) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` whose inputs that are ``nn.Parameter``s are attributes instead (what freezing folds),
    and the positions of the inputs it still takes. ``gm`` itself is left as Dynamo handed it: Dynamo
    still calls the result with every input it traced."""
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    kept = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if not isinstance(value, torch.nn.Parameter):
            kept.append(index)
            continue
        name = f"_frozen_parameter_{index}"
        gm.register_parameter(name, value)
        with gm.graph.inserting_before(node):
            attribute = gm.graph.get_attr(name)
        attribute.meta.update(node.meta)
        node.replace_all_uses_with(attribute)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, kept


def compile_tuned(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
    """``gm`` compiled by Inductor with ``DECODE_TUNING``, its parameters frozen; it must be an inference
    graph (no grad). The result takes the graph's original inputs."""
    from torch._inductor.compile_fx import compile_fx

    frozen, kept = parameters_as_attributes(gm, example_inputs)
    with torch._inductor.config.patch(DECODE_TUNING):
        compiled = compile_fx(frozen, [example_inputs[index] for index in kept])

    def run(*args):
        return compiled(*[args[index] for index in kept])

    return run
