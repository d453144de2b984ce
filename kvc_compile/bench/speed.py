"""Prefill time, decode speed and cache memory of one model run several ways, side by side.

Every variant runs the same prompt in the same process, one after the other, and each timing is
the median of repeated runs after a warm-up, so the ratios between variants are what to read
(absolute times on a shared machine move with its load).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from kvc_compile.cache import CompressedCache, cache_nbytes
from kvc_compile.reference import attention_implementation
from kvc_compile.transformers_compat import output_cache, with_cache


@dataclass(frozen=True)
class SpeedResult:
    variant: str
    compile_s: float  # warm-up: first prefill and 3 decode steps (tracing, compilation and the runs)
    prefill_s: float  # median warm prefill
    decode_tokens_per_s: float
    cache_bytes: int  # after prefill, measured from the cache tensors
    peak_bytes: int | None  # CUDA peak allocated over the runs (None on CPU)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    variant: str,
    forward: Callable,
    new_cache: Callable[[], object],
    input_ids: torch.Tensor,
    new_tokens: int,
    repeats: int = 3,
    announce: str | None = None,
) -> SpeedResult:
    """Time ``forward`` (a model or compiled model) on ``input_ids``, then ``new_tokens`` greedy steps.
    ``announce``: a line for stderr before the warm-up, which may compile for minutes."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = input_ids.shape[1]

    def decode(out, steps: int):
        token = out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            position = torch.tensor([[n + step]], device=device)
            out = forward(token, **with_cache(output_cache(out)), use_cache=True, position_ids=position,
                          cache_position=position[0])
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)

    # Warm-up: the first prefill and a few decode steps compile every graph the timed runs use.
    if announce:
        print(announce, file=sys.stderr, flush=True)
    start = time.perf_counter()
    decode(forward(input_ids, **with_cache(new_cache()), use_cache=True), 3)
    compile_s = time.perf_counter() - start
    prefill_times, decode_rates, cache_bytes = [], [], 0
    for _ in range(repeats):
        cache = new_cache()
        _sync(device)
        start = time.perf_counter()
        out = forward(input_ids, **with_cache(cache), use_cache=True)
        _sync(device)
        prefill_times.append(time.perf_counter() - start)
        cache_bytes = cache_nbytes(output_cache(out))
        start = time.perf_counter()
        decode(out, new_tokens)
        decode_rates.append(new_tokens / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return SpeedResult(variant, compile_s, statistics.median(prefill_times), statistics.median(decode_rates),
                       cache_bytes, peak)


def measure_engine(variant: str, engine, input_ids: torch.Tensor, new_tokens: int, repeats: int = 3,
                   build_s: float = 0.0) -> SpeedResult:
    """Time a built engine (``kvc_compile.Engine``) on the same prompt and number of decode steps as
    ``measure``: it generates ``new_tokens + 1`` tokens, the first from the prefill's logits.
    ``compile_s`` is the build time plus the warm-up run."""
    if engine.manifest.max_new_tokens < new_tokens + 1:
        raise ValueError(f"the engine decodes at most {engine.manifest.max_new_tokens} tokens; build it with "
                         f"--max-new-tokens {new_tokens + 1} or more")
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompt = input_ids.tolist()
    start = time.perf_counter()
    engine.generate(prompt, 4, stop_on_eos=False)
    compile_s = build_s + time.perf_counter() - start
    runs = [engine.generate(prompt, new_tokens + 1, stop_on_eos=False) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return SpeedResult(variant, compile_s, statistics.median(run.prefill_seconds for run in runs),
                       statistics.median(new_tokens / run.decode_seconds for run in runs), runs[-1].cache_bytes, peak)


def bench_variants(
    model: PreTrainedModel, input_ids: torch.Tensor, options: dict, new_tokens: int, repeats: int = 3,
    inductor_baseline: bool = False, engine_target: str | None = None, progress: bool = False,
) -> list[SpeedResult]:
    """Plain transformers with the full cache, optionally Inductor with the full cache, the kvc
    model, and optionally an engine built here for ``engine_target`` (``kvc_compile.build``).
    ``progress``: say on stderr what each step does before it starts (compiling takes minutes)."""
    def say(variant: str, compiles: bool) -> str | None:
        if not progress:
            return None
        what = "compiling (first call; this takes a while)" if compiles else "warming up"
        return (f"kvc-bench: {variant}: {what}, then {repeats} timed run(s) of a {input_ids.shape[1]}-token "
                f"prefill and {new_tokens} decode steps ...")

    variant = "transformers, full cache"
    results = [measure(variant, model, DynamicCache, input_ids, new_tokens, repeats, say(variant, False))]
    if inductor_baseline:
        compiled, variant = torch.compile(model, dynamic=True), "inductor, full cache"
        results.append(measure(variant, compiled, DynamicCache, input_ids, new_tokens, repeats, say(variant, True)))
    with attention_implementation(model, "kvc"):  # the packed / low-rank layouts need it; SDPA otherwise
        variant = f"kvc: {options['method']}"
        compiled = torch.compile(model, backend="kvc", options=options, dynamic=True)
        results.append(measure(variant, compiled, CompressedCache, input_ids, new_tokens, repeats, say(variant, True)))
    if engine_target is not None:
        results.append(_bench_engine(model, input_ids, options, new_tokens, repeats, engine_target, progress))
    return results


def _bench_engine(model, input_ids, options: dict, new_tokens: int, repeats: int, target: str,
                  progress: bool = False) -> SpeedResult:
    from kvc_compile.engine import Engine, build

    with tempfile.TemporaryDirectory(prefix="kvc-bench-engine-") as folder, attention_implementation(model, "kvc"):
        if progress:
            print(f"kvc-bench: building a {target} engine for {options['method']} (this takes a while), then "
                  f"{repeats} timed run(s) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        build(model, options, folder, target=target, max_context=input_ids.shape[1], max_new_tokens=new_tokens + 1,
              max_batch=1, force=True, progress=False)
        engine = Engine.load(folder, trusted=True)  # built just now, by this process
        build_s = time.perf_counter() - start
        return measure_engine(f"engine ({target}): {options['method']}", engine, input_ids, new_tokens, repeats,
                              build_s)


def markdown(results: list[SpeedResult], title: str) -> list[str]:
    base = results[0]
    lines = [f"# {title}", "",
             "| variant | warm-up s | prefill s | decode tok/s | decode speed vs transformers | cache bytes | "
             "cache vs full | peak bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r.peak_bytes:,}" if r.peak_bytes is not None else "n/a (CPU)"
        lines.append(
            f"| {r.variant} | {r.compile_s:.1f} | {r.prefill_s:.3f} | {r.decode_tokens_per_s:.2f} | "
            f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}× | {r.cache_bytes:,} | "
            f"{r.cache_bytes / base.cache_bytes:.3f} | {peak} |"
        )
    return lines
