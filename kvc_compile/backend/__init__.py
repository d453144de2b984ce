"""The ``kvc`` torch.compile backend: run the kvc passes, then hand the graph to Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model,
backend="kvc", options={...})`` works without importing ``kvc_compile`` first.

Besides rewriting graphs, the backend is where the compiled path says what it cannot do silently:

- each compilation prints one line on stderr (what is compiled and how long it took; ``verbose=False``
  or ``KVC_VERBOSE=0`` turns it off), since a first compile of a real model takes minutes;
- when a function reaches Dynamo's recompile limit, later new shapes would run the unmodified model
  with an uncompressed cache: a ``RecompileLimitWarning`` says so, and how to avoid it;
- a plain ``DynamicCache`` cannot represent a compressed left-padded batch: such a prefill is refused
  when it runs, naming ``CompressedCache``.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from kvc_compile.backend.grad_mode import builds_backward, compile_for_inference
from kvc_compile.backend.tuning import compile_tuned
from kvc_compile.config import CompressionConfig
from kvc_compile.passes import PassManager
from kvc_compile.passes.attention_sites import compiled_code, dynamo_compile_frame, root_module_name
from kvc_compile.transformers_compat import CACHE_ARG


class RecompileLimitWarning(UserWarning):
    """Dynamo will run further new shapes of a kvc-compiled function without the kvc pass."""


class PaddedBatchError(ValueError):
    """A left-padded batch whose compressed cache a plain ``DynamicCache`` would decode wrongly."""


_warned_limits: set[tuple[int, int]] = set()


def kvc_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    # torch.compile refuses mode together with options, so ``mode`` only arrives alone; accepting it
    # lets that call reach the clear "needs options" error instead of a TypeError.
    config = CompressionConfig.from_options(options)  # validate before touching the graph
    if builds_backward(gm, example_inputs):
        return compile_for_inference(gm, lambda: kvc_backend(gm, example_inputs, options, mode))
    started = time.perf_counter()
    warn_at_recompile_limit(gm)
    manager = PassManager(config)
    manager.run(gm)
    # Only decode graphs are tuned (kvc_compile.backend.tuning), and only when Inductor compiles them.
    tuned = (config.tune_decode and config.inner_backend == "inductor" and bool(manager.sites)
             and not manager.compiles_prefill)
    progress = Progress(config, gm, manager, tuned) if config.reports_progress else None
    try:
        if config.inner_backend == "eager":
            compiled = gm.forward
        elif tuned:
            compiled = compile_tuned(gm, example_inputs)
        else:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs)
    except BaseException as error:
        if progress is not None:
            # Dynamo's own restarts (e.g. a float it makes symbolic) trace and compile the graph again.
            restart = isinstance(error, torch._dynamo.exc.RestartAnalysis)
            progress.finish("restarted by Dynamo, which traces it again," if restart else "failed", started)
        raise
    if progress is not None:
        progress.finish("done", started)
    if manager.padding_mask_index is not None:
        compiled = refuse_padded_rows(compiled, manager.padding_mask_index, config)
    return compiled


class Progress:
    """One line on stderr per compilation: what is compiled, then how long it took."""

    def __init__(self, config: CompressionConfig, gm: fx.GraphModule, manager: PassManager, tuned: bool) -> None:
        kind = "prefill" if manager.compiles_prefill else "decode"
        method = config.method + (" + kqsvd" if config.lowrank is not None and config.evicts else "")
        sites = len(manager.sites)
        print(
            f"kvc: compiling the {kind} graph of {root_module_name(gm)} ({method}, {sites} attention "
            f"site{'s' if sites != 1 else ''}, {config.inner_backend}{', tuned' if tuned else ''}) ...",
            end="", file=sys.stderr, flush=True,
        )

    @staticmethod
    def finish(outcome: str, started: float) -> None:
        print(f" {outcome} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def recompile_limit() -> int:
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", None) or config.cache_size_limit


def compilations_before() -> int | None:
    """How many compiled entries Dynamo already holds for the frame it is compiling (counted as its
    recompile limit counts them: for the same module object), or None outside Dynamo."""
    frame = dynamo_compile_frame()
    if frame is None:
        return None
    return getattr(frame.f_locals.get("cache_size"), "num_cache_entries_with_same_id_matched_objs", None)


def warn_at_recompile_limit(gm: fx.GraphModule) -> None:
    """Warn when this compilation is the last one Dynamo's recompile limit allows for the function:
    Dynamo runs any later new shape with the original code, i.e. the unmodified model, whose cache
    is not compressed."""
    before, code = compilations_before(), compiled_code()
    if before is None or code is None or before + 1 < recompile_limit():
        return
    key = (id(code), before)
    if key in _warned_limits:
        return
    _warned_limits.add(key)
    name = f"{code.co_name} ({code.co_filename}:{code.co_firstlineno}) of {root_module_name(gm)}"
    warnings.warn(
        f"kvc: {name} has now been compiled {before + 1} times, Dynamo's recompile limit "
        f"(torch._dynamo.config.recompile_limit = {recompile_limit()}): Dynamo will run any further new input "
        f"shape (a new prompt length, batch size or cache length) with the unmodified model, and its KV cache "
        f"will NOT be compressed. Compile with dynamic=True (model.compile(backend='kvc', options=..., "
        f"dynamic=True): one prefill graph serves every prompt length), or raise "
        f"torch._dynamo.config.recompile_limit; torch._dynamo.config.fail_on_recompile_limit_hit = True makes "
        f"Dynamo fail instead of falling back",
        RecompileLimitWarning, stacklevel=2,
    )


def refuse_padded_rows(compiled: Callable, mask_index: int, config: CompressionConfig) -> Callable:
    """Wrap a prefill graph compiled for a plain ``DynamicCache`` so that it refuses a padded batch.

    The check reads the attention mask (one host sync per prefill, only on this path); the graph
    itself stays free of data-dependent control flow.
    """
    def check(args) -> None:
        mask = args[mask_index]
        n = mask.shape[-1]
        if config.kept_length(n) < n and not bool(mask.all()):
            raise PaddedBatchError(
                f"kvc: this batch is padded and {config.method} compresses its cache, which a plain "
                f"DynamicCache cannot represent (it would line the attention mask up with the wrong entries and "
                f"decode wrong tokens for the padded rows): pass {CACHE_ARG}=kvc_compile.CompressedCache() "
                f"(to generate() or the forward call)"
            )

    def run(*args):  # Dynamo calls a backend's result with the graph inputs as positional arguments
        check(args)
        return compiled(*args)

    return run


__all__ = ["PaddedBatchError", "RecompileLimitWarning", "kvc_backend"]
