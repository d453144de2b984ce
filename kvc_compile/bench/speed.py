"""Prefill time, decode speed and cache memory of one model run several ways, side by side, with
each decode step judged against the memory-bandwidth bound.

Every variant runs the same prompt in the same process, one after the other, and each timing is
the median of repeated runs after a warm-up, so the ratios between variants are what to read
(absolute times on a shared machine move with its load).

A decode step must at least read the model's weights and the live keys and values once, so its
time is bounded below by those bytes over the memory bandwidth, which is measured in the same run
(:func:`memory_bandwidth`). The report gives each variant's fraction of that bound and, for a
compressed cache, its speedup over the full cache next to the bound's ratio: how much of the
memory a smaller cache saves turns into speed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from kvc_compile.backend.tuning import compile_tuned
from kvc_compile.cache import CompressedCache, cache_nbytes
from kvc_compile.models import attention_head_dim
from kvc_compile.reference import attention_implementation
from kvc_compile.transformers_compat import output_cache, with_cache

MiB = 1 << 20
#: The streaming read's default size: large enough to leave every cache level behind.
BANDWIDTH_BYTES = {"cpu": 512 * MiB, "cuda": 4096 * MiB}


@dataclass(frozen=True)
class ReadBound:
    """What one decode step must read, and how fast this machine reads: the run's memory-bandwidth bound."""

    weight_bytes: int  # the model's parameters, each storage once (tied embeddings once)
    token_bytes: int  # keys and values one decoded token adds: all layers and rows, at head_dim
    bandwidth: float  # bytes/s of a streaming read measured in this run
    buffer_bytes: int  # the size of that read

    def step_bytes(self, kv_bytes: int, new_tokens: int) -> int:
        """Mean bytes per decode step: the weights, the live keys and values after prefill, and the
        cache's growth over half the decoded tokens (the mean over the steps). The growth is the
        full-precision one: an over-estimate for a low-rank cache, whose entries are smaller."""
        return self.weight_bytes + kv_bytes + new_tokens * self.token_bytes // 2


@dataclass(frozen=True)
class SpeedResult:
    variant: str
    compile_s: float  # warm-up: first prefill and 3 decode steps (tracing, compilation and the runs)
    prefill_s: float  # median warm prefill
    decode_tokens_per_s: float  # every row's tokens: batch × decode steps per second (median run)
    cache_bytes: int  # after prefill, measured from the cache tensors' storages (with positions, heads)
    peak_bytes: int | None  # CUDA peak allocated over the runs (None on CPU)
    decode_ms_per_step: float = math.nan  # median run's time of one decode step (every row at once)
    kv_bytes: int = 0  # live keys and values after prefill (an engine: the cache bytes it reports)
    kind: str = "eager"  # how it runs: "eager" (transformers), "compiled" (torch.compile) or "engine"
    full_cache: bool = True
    bound: ReadBound | None = None
    step_bytes: int = 0  # what one decode step reads on average (ReadBound.step_bytes)

    @property
    def bound_ms(self) -> float:
        """The fastest decode step the measured bandwidth allows: step bytes / bandwidth."""
        return 1000 * self.step_bytes / self.bound.bandwidth if self.bound is not None else math.nan

    @property
    def of_bound(self) -> float:
        """Fraction of the bound achieved (1: decoding as fast as memory can be read)."""
        return self.bound_ms / self.decode_ms_per_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each storage counted once: tied weights (an lm_head sharing
    the embedding) are read once per step, so they count once."""
    storages = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        storage = parameter.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def live_kv_bytes(cache) -> int:
    """Bytes of the keys and values the cache's layers hold (positions and heads not counted). A
    layer's ``keys`` may be a view of a larger preallocated buffer, so the tensors' sizes count, not
    their storages'; packed layers' [batch, 1, T, d] entries count the same way."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def token_kv_bytes(config: PretrainedConfig, batch: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values one decoded token adds to a full cache: 2 × layers × batch ×
    kv_heads × head_dim × itemsize (every layer grows; a sliding-window layer past its window does
    not, so there this over-estimates)."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = attention_head_dim(config)
    return 2 * config.num_hidden_layers * batch * kv_heads * head_dim * dtype.itemsize


def default_bandwidth_bytes(device: torch.device) -> int:
    """512 MiB on the CPU; on CUDA 4 GiB, or half the free memory when less is free."""
    if device.type != "cuda":
        return BANDWIDTH_BYTES["cpu"]
    free, _ = torch.cuda.mem_get_info(device)
    return max(MiB, min(BANDWIDTH_BYTES["cuda"], free // 2 // MiB * MiB))


@torch.no_grad()
def memory_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second this process reads from memory: the median time of ``sum()`` over a float32
    buffer of ``nbytes`` (default :func:`default_bandwidth_bytes`), after one untimed pass. A read,
    not a copy, since a decode step mostly reads (weights and cache)."""
    device = torch.device(device)
    nbytes = default_bandwidth_bytes(device) if nbytes is None else nbytes
    buffer = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).fill_(1)
    buffer.sum()  # first touch and warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        buffer.sum()
        _sync(device)
        times.append(time.perf_counter() - start)
    size = buffer.numel() * buffer.element_size()
    del buffer
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the variants' peak memory should not see it
    return size / max(statistics.median(times), 1e-9)


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
    """Time ``forward`` (a model or compiled model) on ``input_ids`` ([batch, length]), then
    ``new_tokens`` greedy steps, each feeding [batch, 1] tokens (the position ids broadcast over rows).
    ``announce``: a line for stderr before the warm-up, which may compile for minutes."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch, n = input_ids.shape

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
    prefill_times, decode_times, cache_bytes, kv_bytes = [], [], 0, 0
    for _ in range(repeats):
        cache = new_cache()
        _sync(device)
        start = time.perf_counter()
        out = forward(input_ids, **with_cache(cache), use_cache=True)
        _sync(device)
        prefill_times.append(time.perf_counter() - start)
        cache_bytes, kv_bytes = cache_nbytes(output_cache(out)), live_kv_bytes(output_cache(out))
        start = time.perf_counter()
        decode(out, new_tokens)
        decode_times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    seconds = statistics.median(decode_times)
    return SpeedResult(variant, compile_s, statistics.median(prefill_times), batch * new_tokens / seconds,
                       cache_bytes, peak, 1000 * seconds / new_tokens, kv_bytes)


def measure_engine(variant: str, engine, input_ids: torch.Tensor, new_tokens: int, repeats: int = 3,
                   build_s: float = 0.0) -> SpeedResult:
    """Time a built engine (``kvc_compile.Engine``) on the same prompt rows and number of decode steps
    as ``measure``: it generates ``new_tokens + 1`` tokens per row, the first from the prefill's
    logits. ``compile_s`` is the build time plus the warm-up run. The live cache is the one the
    engine reports: the prefill's kept entries with their positions (not its decode buffers' capacity)."""
    if engine.manifest.max_new_tokens < new_tokens + 1:
        raise ValueError(f"the engine decodes at most {engine.manifest.max_new_tokens} tokens; build it with "
                         f"--max-new-tokens {new_tokens + 1} or more")
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompts = input_ids.tolist()  # one prompt per row
    start = time.perf_counter()
    engine.generate(prompts, 4, stop_on_eos=False)
    compile_s = build_s + time.perf_counter() - start
    runs = [engine.generate(prompts, new_tokens + 1, stop_on_eos=False) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    seconds = statistics.median(run.decode_seconds for run in runs)
    cache_bytes = runs[-1].cache_bytes
    return SpeedResult(variant, compile_s, statistics.median(run.prefill_seconds for run in runs),
                       len(prompts) * new_tokens / seconds, cache_bytes, peak, 1000 * seconds / new_tokens,
                       cache_bytes, kind="engine", full_cache=False)


def size_label(options: dict) -> str:
    """A kvc variant's size as its options give it: "ratio 0.5", "budget 512" or "every token kept"."""
    if "compression_ratio" in options:
        return f"ratio {options['compression_ratio']:g}"
    if "budget" in options:
        return f"budget {options['budget']}"
    return "every token kept"


def bench_variants(
    model: PreTrainedModel, input_ids: torch.Tensor, options: dict | Sequence[dict], new_tokens: int,
    repeats: int = 3, inductor_baseline: bool = False, engine_target: str | None = None, progress: bool = False,
    bandwidth_bytes: int | None = None, engine_max_contexts: Sequence[int] = (), tune_decode: bool = False,
) -> list[SpeedResult]:
    """Plain transformers with the full cache, optionally Inductor with the full cache, the kvc
    model for each of ``options`` (one method's options, or several side by side), and optionally an
    engine built here for ``engine_target`` (``kvc_compile.build``) for each of them: built for the
    prompt's length, or once for each of ``engine_max_contexts`` (its ``max_context``). Every variant
    runs the prompt's rows as one batch. Each result carries the run's :class:`ReadBound`, with the
    bandwidth measured here over ``bandwidth_bytes`` (default :func:`default_bandwidth_bytes`).
    ``progress``: say on stderr what each step does before it starts (compiling takes minutes).
    ``tune_decode``: compile with Inductor's max-autotune and frozen weights (``kvc_compile.backend.tuning``):
    the kvc variants' decode graphs (their ``tune_decode`` option) and every graph of the Inductor baseline
    (which has no kvc pass to tell its decode graphs apart), and an AOTInductor engine's decode programs
    (other engine targets refuse it: Inductor does not compile them)."""
    variants = [options] if isinstance(options, dict) else list(options)
    if tune_decode:
        variants = [{**variant_options, "tune_decode": True} for variant_options in variants]
    batch, length = input_ids.shape
    rows = f" × {batch} rows" if batch > 1 else ""

    def say(variant: str, compiles: bool) -> str | None:
        if not progress:
            return None
        what = "compiling (first call; this takes a while)" if compiles else "warming up"
        return (f"kvc-bench: {variant}: {what}, then {repeats} timed run(s) of a {length}-token{rows} "
                f"prefill and {new_tokens} decode steps ...")

    def label(variant_options: dict) -> str:  # the size too when several kvc variants share the table
        method = variant_options["method"]
        return method if len(variants) == 1 else f"{method}, {size_label(variant_options)}"

    if progress:
        print("kvc-bench: measuring the memory bandwidth ...", file=sys.stderr, flush=True)
    size = default_bandwidth_bytes(input_ids.device) if bandwidth_bytes is None else bandwidth_bytes
    bound = ReadBound(weight_bytes(model), token_kv_bytes(model.config, batch, model.dtype),
                      memory_bandwidth(input_ids.device, size), size)

    def judged(result: SpeedResult, kind: str, full_cache: bool) -> SpeedResult:
        return dataclasses.replace(result, kind=kind, full_cache=full_cache, bound=bound,
                                   step_bytes=bound.step_bytes(result.kv_bytes, new_tokens))

    variant = "transformers, full cache"
    results = [judged(measure(variant, model, DynamicCache, input_ids, new_tokens, repeats, say(variant, False)),
                      "eager", True)]
    # A fresh Dynamo cache after each compiled variant: past its recompile limit Dynamo would run the
    # next variants eagerly, without compression.
    if inductor_baseline:
        # Inductor's own settings would arrive after Dynamo has made the weights graph inputs, which
        # freezing cannot fold: the tuned baseline goes through compile_tuned, as kvc's decode graphs do.
        inductor = compile_tuned if tune_decode else "inductor"
        compiled, variant = torch.compile(model, backend=inductor, dynamic=True), "inductor, full cache"
        try:
            result = measure(variant, compiled, DynamicCache, input_ids, new_tokens, repeats, say(variant, True))
        finally:
            torch._dynamo.reset()
        results.append(judged(result, "compiled", True))
    for variant_options in variants:
        with attention_implementation(model, "kvc"):  # the packed / low-rank layouts need it; SDPA otherwise
            variant = f"kvc: {label(variant_options)}"
            compiled = torch.compile(model, backend="kvc", options=variant_options, dynamic=True)
            try:
                result = measure(variant, compiled, CompressedCache, input_ids, new_tokens, repeats,
                                 say(variant, True))
            finally:
                torch._dynamo.reset()
        results.append(judged(result, "compiled", False))
    if engine_target is not None:
        for variant_options in variants:
            for max_context in engine_max_contexts or (length,):
                result = _bench_engine(model, input_ids, variant_options, new_tokens, repeats, engine_target,
                                       progress, label(variant_options), max_context)
                results.append(judged(result, "engine", False))
    return results


def _bench_engine(model, input_ids, options: dict, new_tokens: int, repeats: int, target: str,
                  progress: bool = False, label: str | None = None, max_context: int | None = None) -> SpeedResult:
    """An engine built for ``max_context``-token prompts (default: the prompt's length) and timed."""
    from kvc_compile.engine import Engine, build

    label = label or options["method"]
    length = input_ids.shape[1]
    max_context = max_context or length
    if max_context < length:
        raise ValueError(f"an engine built for {max_context}-token prompts cannot take the {length}-token prompt")
    built_for = "" if max_context == length else f", built for {max_context}-token prompts"
    with tempfile.TemporaryDirectory(prefix="kvc-bench-engine-") as folder, attention_implementation(model, "kvc"):
        if progress:
            print(f"kvc-bench: building a {target} engine for {label}{built_for} (this takes a while), then "
                  f"{repeats} timed run(s) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        build(model, options, folder, target=target, max_context=max_context, max_new_tokens=new_tokens + 1,
              max_batch=input_ids.shape[0], force=True, progress=False)
        engine = Engine.load(folder, trusted=True)  # built just now, by this process
        build_s = time.perf_counter() - start
        return measure_engine(f"engine ({target}{built_for}): {label}", engine, input_ids, new_tokens, repeats,
                              build_s)


def _baseline(result: SpeedResult, results: list[SpeedResult]) -> SpeedResult:
    """The full-cache row a compressed one is compared with: the compiled full cache (Inductor) for a
    compiled model or an engine when the run has it, else plain transformers."""
    full = [r for r in results if r.full_cache]
    compiled = [r for r in full if r.kind == "compiled"]
    return compiled[0] if compiled and result.kind != "eager" else full[0]


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else "n/a"


def markdown(results: list[SpeedResult], title: str) -> list[str]:
    """The title, the table (one row per variant) and, when the results carry the run's bound, a
    legend saying how the bound is computed and the bandwidth measured."""
    base = results[0]
    lines = [f"# {title}", "",
             "| variant | warm-up s | prefill s | decode tok/s | decode speed vs transformers | cache bytes | "
             "cache vs full | peak bytes | decode ms/step | bytes/step | bound ms | of bound | "
             "speedup vs full cache | bound's ratio | of bound's ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r.peak_bytes:,}" if r.peak_bytes is not None else "n/a (CPU)"
        if r.full_cache or not any(other.full_cache for other in results):
            speedup = ratio = achieved = "—"
        else:
            full = _baseline(r, results)
            gain, bound_gain = full.decode_ms_per_step / r.decode_ms_per_step, full.bound_ms / r.bound_ms
            speedup, ratio, achieved = f"{_number(gain, 3)}×", f"{_number(bound_gain, 3)}×", _number(
                gain / bound_gain, 3)
        lines.append(
            f"| {r.variant} | {r.compile_s:.1f} | {r.prefill_s:.3f} | {r.decode_tokens_per_s:.2f} | "
            f"{r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}× | {r.cache_bytes:,} | "
            f"{r.cache_bytes / base.cache_bytes:.3f} | {peak} | {_number(r.decode_ms_per_step)} | "
            f"{r.step_bytes:,} | {_number(r.bound_ms)} | {_number(r.of_bound, 3)} | {speedup} | {ratio} | {achieved} |"
        )
    bound = base.bound
    if bound is None:
        return lines
    compiled_full = any(r.full_cache and r.kind == "compiled" for r in results)
    baselines = ('"inductor, full cache" (compiled rows and engines) or "transformers, full cache"' if compiled_full
                 else '"transformers, full cache"')
    lines += [
        "",
        f"Bound: a decode step must read the weights ({bound.weight_bytes:,} bytes, each parameter storage once) "
        f"and the live keys and values (those after prefill, plus the growth over half the new tokens at "
        f"{bound.token_bytes:,} bytes per token for all layers and rows; positions and heads not counted, a "
        f"low-rank cache's growth over-estimated): bound ms = bytes/step / bandwidth, with a measured bandwidth "
        f"of {bound.bandwidth / 1e9:.2f} GB/s (median `sum()` over {bound.buffer_bytes / MiB:g} MiB of float32); "
        f"of bound = bound ms / decode ms/step (1 = as fast as memory is read). Decode tok/s counts every row.",
        f"Speedup vs full cache: the decode ms/step of {baselines} over the row's; bound's ratio: the same full "
        f"cache's bound ms over the "
        f"row's (the speedup a purely bandwidth-bound step would get); of bound's ratio = speedup / bound's ratio.",
    ]
    if any(r.kind == "engine" for r in results):
        lines.append("Engines: their live cache is the cache bytes the engine reports (the prefill's kept entries "
                     "with their positions), not capacity; their decode steps attend over the live prefix of "
                     "their buffers (the kept entries and one slot per token so far; a packed cache also the "
                     "empty slots of layers that kept fewer than their prompt slots).")
    return lines
