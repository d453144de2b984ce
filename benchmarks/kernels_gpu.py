"""Compression overhead of the fused Triton kernels vs the PyTorch reference vs kvpress-style eager
scoring, as a fraction of prefill time, at long contexts on one GPU (side by side, one run).

Per attention layer of a Llama-3-8B-shaped decoder (32 query heads, 8 KV heads, head_dim 128,
hidden 4096, bf16, random weights): the time of one layer's prefill (``LlamaDecoderLayer`` with
SDPA) and the time of SnapKV's compression of that layer's cache (window 32, max pool 7, ratio
0.5) by three paths:

- ``fused``: ``kvc::window_votes`` (two-pass Triton scoring, no attention matrix in memory) and
  ``kvc::select_and_gather`` (radix select + compaction);
- ``reference``: the same method through the pure-PyTorch reference (fp32 window attention
  materialised, a stable ``sort``, ``gather``; the radix select that ``top_positions`` uses for
  CUDA tensors is switched off for it);
- ``kvpress-style``: what a hook-based press does: repeat KV heads to the query heads, window
  attention in the model's dtype, softmax in fp32, mean over the window and the GQA group,
  pooling, ``topk`` and ``gather`` of the kept indices.

AdaKV over the same SnapKV scorer (head-adaptive budgets: the layer's heads compete for one budget,
stored in the packed layout) is timed the same way, fused scoring then the head-adaptive selection
and packing, and through the reference.

Every layer costs the same, so the per-layer ratio is the model's. Targets: overhead <= 2 % of
prefill at 32K. Compression runs eagerly, as the pass calls it once per prompt. Decode attention
bandwidth: one decoding step's bytes of K and V (and entry labels) over its time, as a fraction of
``--peak-gbps``, for SDPA over the full dense cache and for the variable-length packed kernel over a
half-size packed cache (target >= 70 %); timed eagerly and as a replayed CUDA graph (what a
compiled decode step with ``mode="reduce-overhead"`` runs: no Python launch cost per kernel).

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels-h100.md
    python benchmarks/kernels_gpu.py --batch 8 --contexts 32768 --out benchmarks/results/kernels-h100-b8.md
    python benchmarks/kernels_gpu.py --dry-run --out /tmp/kernels.md   # tiny shapes, any machine

``--dry-run`` runs every path on tiny shapes (4 query heads, 2 KV heads, contexts 256 and 512) on
whatever device there is, so the script is known to run before GPU time is spent on it; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from kvc_compile.bench import provenance_lines, write_report
from kvc_compile.compression.prefill import compress_layer
from kvc_compile.methods.adakv import AdaKV
from kvc_compile.methods.base import ScoreInputs
from kvc_compile.methods.kernels import REFERENCE, Kernels, using_kernels
from kvc_compile.methods.snapkv import SnapKV
from kvc_compile.ops.kernels import GPU_KERNELS, packed_attention, use_kernels

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             num_hidden_layers=1, max_position_embeddings=40000)
TINY_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=1, max_position_embeddings=1024)
METHOD = SnapKV(window_size=32, kernel_size=7, pooling="max")
HEAD_ADAPTIVE = AdaKV(scorer="snapkv", scorer_options={"window_size": 32, "kernel_size": 7, "pooling": "max"})


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after a warm-up (CUDA events on the GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def graph_timed(fn, repeats: int, replays: int = 20) -> float:
    """Median seconds of one ``fn()`` captured in a CUDA graph, over ``repeats`` timings of
    ``replays`` back-to-back replays each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph: Triton compiles, allocator settles
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / replays)
    return sorted(times)[len(times) // 2]


def timed_with(kernels: Kernels, fn, repeats: int) -> float:
    """``timed`` with scoring and selection running ``kernels`` (``REFERENCE``: PyTorch alone)."""
    with using_kernels(kernels):
        return timed(fn, repeats)


def kvpress_style(queries, keys, values, n_kept: int, window: int = 32, kernel: int = 7):
    """Window attention over repeated KV heads in the model dtype, then pooling, topk, gather."""
    batch, q_heads, n, head_dim = queries.shape
    group = q_heads // keys.shape[1]
    repeated = keys.repeat_interleave(group, dim=1)
    logits = queries[:, :, -window:] @ repeated.transpose(-1, -2) / head_dim**0.5
    causal = torch.ones(window, window, device=keys.device, dtype=torch.bool).tril()
    logits[..., -window:] = logits[..., -window:].masked_fill(~causal, float("-inf"))
    weights = logits.float().softmax(dim=-1)
    votes = weights[..., :-window].mean(dim=-2).view(batch, keys.shape[1], group, n - window).mean(dim=2)
    votes = F.max_pool1d(votes, kernel, stride=1, padding=kernel // 2)
    scores = F.pad(votes, (0, window), value=float("inf"))
    kept = scores.topk(n_kept, dim=-1).indices
    index = kept.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    return keys.gather(2, index), values.gather(2, index)


def measure(
    n: int, batch: int, shape: dict, layer, rotary, device: str, dtype: torch.dtype, repeats: int, peak_gbps: float
) -> tuple[list[str], list[str]]:
    """Table rows for one context length: prefill of one layer and the compression paths; decode."""
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // heads
    hidden = torch.randn(batch, n, shape["hidden_size"], device=device, dtype=dtype)
    embeddings = rotary(hidden, torch.arange(n, device=device)[None])
    prefill = timed(lambda: layer(hidden, position_embeddings=embeddings, attention_mask=None), repeats)
    queries = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
    keys = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    kernels = GPU_KERNELS if use_kernels(keys) else REFERENCE
    fused = "fused" if kernels is GPU_KERNELS else "fused (no kernels here: reference)"
    inputs = ScoreInputs(queries, keys, values, valid, 0)
    times = {
        f"snapkv, {fused}": timed_with(kernels, lambda: compress_layer(METHOD, n // 2, inputs), repeats),
        "snapkv, reference": timed_with(REFERENCE, lambda: compress_layer(METHOD, n // 2, inputs), repeats),
        "snapkv, kvpress-style": timed(lambda: kvpress_style(queries, keys, values, n // 2), repeats),
        f"adakv over snapkv, {fused}": timed_with(
            kernels, lambda: compress_layer(HEAD_ADAPTIVE, n // 2, inputs), repeats),
        "adakv over snapkv, reference": timed_with(
            REFERENCE, lambda: compress_layer(HEAD_ADAPTIVE, n // 2, inputs), repeats),
    }
    rows = [f"| {n} | {name} | {prefill * 1e3:.2f} | {seconds * 1e3:.2f} | {seconds / prefill:.2%} |"
            for name, seconds in times.items()]
    query = queries[:, :, -1:]
    decode_rows = [decode_row(n, "SDPA, dense, full cache", 2 * keys.numel() * keys.element_size(),
                              lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
                              device, repeats, peak_gbps)]
    # The packed layout AdaKV-style budgets leave: half the entries, heads of different lengths.
    total = kv_heads * n // 2
    packed_keys = torch.randn(batch, 1, total, head_dim, device=device, dtype=dtype)
    packed_values = torch.randn_like(packed_keys)
    labels = torch.randint(0, kv_heads, (batch, 1, total), device=device, dtype=torch.int32)
    labels[..., -kv_heads:] = torch.arange(kv_heads, device=device, dtype=torch.int32)
    packed_bytes = 2 * packed_keys.numel() * packed_keys.element_size() + labels.numel() * labels.element_size()
    decode_rows.append(decode_row(
        n, f"packed, half the entries, {'Triton' if kernels is GPU_KERNELS else 'reference'}", packed_bytes,
        lambda: packed_attention(query, packed_keys, packed_values, labels, kv_heads, head_dim**-0.5),
        device, repeats, peak_gbps))
    return rows, decode_rows


def decode_row(n: int, path: str, nbytes: int, fn, device: str, repeats: int, peak_gbps: float) -> str:
    """One decode-attention row: bytes read, eager and CUDA-graph times, the graph's bandwidth."""
    eager = timed(fn, repeats)
    graph = graph_timed(fn, repeats) if device == "cuda" else eager
    bandwidth = nbytes / graph / 1e9
    return (f"| {n} | {path} | {nbytes / 2**20:.0f} | {eager * 1e3:.3f} | {graph * 1e3:.3f} | "
            f"{bandwidth:.0f} GB/s = {bandwidth / peak_gbps:.0%} |")


def device_line(device: str) -> str:
    """The GPU, its CUDA and driver, and Triton's version (which compiled the kernels)."""
    if device != "cuda":
        return "cpu"
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        driver = "unknown"
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
            f"CUDA {torch.version.cuda}, driver {driver}; triton {triton.__version__}")


# HBM bandwidth from the vendors' data sheets, by a word of the device name.
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0}


def spec_peak_gbps(device: str) -> float:
    """The data-sheet HBM peak of this GPU; a GPU not in ``PEAK_GBPS`` needs ``--peak-gbps``."""
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((gbps for word, gbps in PEAK_GBPS.items() if word in name), None)
    if peak is None:
        raise SystemExit(f"no known memory bandwidth for {name!r}: give --peak-gbps (GB/s, from its data sheet)")
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--batch", type=int, default=1, help="prompt rows compressed and decoded together")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="HBM peak in GB/s (default: the device's spec when known: H100 SXM 3350, H200 4800)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes (contexts 256,512, 2 repeats) on any device: checks that every path runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY_SHAPE if args.dry_run else SHAPE
    if args.dry_run:
        args.contexts, args.repeats = "256,512", 2
        args.peak_gbps = args.peak_gbps or 1.0  # the fractions of peak mean nothing in a dry run
    if args.peak_gbps is None:
        args.peak_gbps = spec_peak_gbps(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()
    rotary = LlamaRotaryEmbedding(config).to(device)
    start = time.perf_counter()
    rows, decode_rows = [], []
    with torch.no_grad():
        for n in args.contexts.split(","):
            compression, decode = measure(int(n), args.batch, shape, layer, rotary, device, dtype, args.repeats,
                                          args.peak_gbps)
            rows += compression
            decode_rows += decode
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    name = "tiny shapes, a dry run: the numbers mean nothing" if args.dry_run else "Llama-3-8B shapes"
    lines = [
        f"# Compression overhead per layer, {name} ({dtype}, {device}, batch {args.batch})",
        "",
        "| context | path | prefill ms (one layer) | compression ms | overhead |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"## Decode attention, one step ({heads} query heads, {kv_heads} KV heads; peak {args.peak_gbps:.0f} GB/s)",
        "",
        "| context | path | MiB read | eager ms | CUDA graph ms | bandwidth (graph), % of peak |",
        "|---|---|---|---|---|---|",
        *decode_rows,
        "",
        *provenance_lines(time.perf_counter() - start),
        f"- device: {device_line(device)}",
        f"- timing: median of {args.repeats} runs after a warm-up, CUDA events; a CUDA graph time is the mean of "
        "20 back-to-back replays, median of as many runs",
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
