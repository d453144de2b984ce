"""What a decode step's two big ops achieve on this machine, against a streaming read.

The weights' matrix multiplies at decode shapes (one or a few rows against a cold weight) and the
decode attention candidates over a grouped cache (the GQA group as query rows, ``enable_gqa`` over
all query heads, and ``baddbmm`` + softmax + ``bmm``), each as bytes read per second. Shapes are
SmolLM2-135M's (3 KV heads of 64, a 3-query-head group, 576-wide, 49152-token vocabulary) unless
given; the streaming read is the same ``sum()`` as ``kvc-bench``'s bound.

    python benchmarks/decode_ops_cpu.py [--batch 8] [--entries 1024,2048,4096]
    python benchmarks/decode_ops_cpu.py --entries 1024 --layers 30   # cold caches, as in a decode step
    python benchmarks/decode_ops_cpu.py --entries 1024 --layers 30 --compile   # each candidate through Inductor

With ``--layers N`` each attention candidate runs over N layers' caches in turn, as a decode step
does, so that each call reads keys and values that are not in the CPU's caches (30 layers of
SmolLM2 at batch 8 × 1024 entries are 377 MB); one layer (the default) measures warm caches.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F


def milliseconds(fn: Callable[[], object], repeats: int = 10) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def gigabytes_per_second(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def matmul_rates(in_features: int, out_features: int, rows: int) -> tuple[float, float]:
    """GB/s of ``F.linear`` and of the weight on the left (``W @ x^T``) over a cold weight."""
    weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    nbytes = weight.numel() * 4
    return (gigabytes_per_second(nbytes, milliseconds(partial(F.linear, x, weight))),
            gigabytes_per_second(nbytes, milliseconds(partial(torch.mm, weight, x.t()))))


def gemm_softmax_gemm(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      additive: torch.Tensor) -> torch.Tensor:
    batch, kv_heads, group, dim = query.shape
    scores = torch.baddbmm(additive, query.reshape(-1, group, dim), keys.flatten(0, 1).mT, alpha=dim ** -0.5)
    return torch.bmm(torch.softmax(scores, -1), values.flatten(0, 1))


def masked_gemm_softmax_gemm(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """The form a decode graph can use: matmuls over the grouped cache, the boolean mask in the softmax."""
    scores = torch.matmul(query, keys.mT) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(mask.logical_not(), float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), values)


def attention_candidates(batch: int, kv_heads: int, group: int, dim: int, entries: int,
                         layers: int = 1, compiled: bool = False) -> dict[str, Callable]:
    """Each candidate over ``layers`` layers' caches in turn (one call per layer); ``compiled``: each
    candidate's function through ``torch.compile`` (Inductor), as a compiled decode graph runs it."""
    per_layer = [_layer_candidates(batch, kv_heads, group, dim, entries, compiled) for _ in range(layers)]

    def in_turn(name: str) -> Callable:
        calls = [candidates[name] for candidates in per_layer]
        return lambda: [call() for call in calls]

    return {name: in_turn(name) for name in per_layer[0]}


_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _layer_candidates(batch: int, kv_heads: int, group: int, dim: int, entries: int,
                      compiled: bool = False) -> dict[str, Callable]:
    query = torch.randn(batch, kv_heads, group, dim)
    keys, values = torch.randn(batch, kv_heads, entries, dim), torch.randn(batch, kv_heads, entries, dim)
    mask = torch.ones(batch, 1, 1, entries, dtype=torch.bool)
    sdpa = _compiled(F.scaled_dot_product_attention) if compiled else F.scaled_dot_product_attention
    gemms = _compiled(gemm_softmax_gemm) if compiled else gemm_softmax_gemm
    masked_gemms = _compiled(masked_gemm_softmax_gemm) if compiled else masked_gemm_softmax_gemm
    return {
        "grouped SDPA, mask": partial(sdpa, query, keys, values, attn_mask=mask),
        "grouped SDPA, no mask": partial(sdpa, query, keys, values),
        "SDPA enable_gqa, mask": partial(sdpa, query.reshape(batch, kv_heads * group, 1, dim), keys, values,
                                         attn_mask=mask, enable_gqa=True),
        "baddbmm+softmax+bmm": partial(gemms, query, keys, values,
                                       torch.zeros(batch * kv_heads, group, entries)),
        "matmul+masked softmax+matmul": partial(masked_gemms, query, keys, values, mask),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--entries", default="1024,2048,4096", help="cached entries per KV head")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1, help="caches read in turn (30: cold, as in a step)")
    parser.add_argument("--compile", action="store_true", help="run each attention candidate through Inductor")
    args = parser.parse_args()
    torch.manual_seed(0)
    stream = torch.randn(128 * 2**20)  # 512 MiB
    print(f"threads {torch.get_num_threads()}; streaming sum(): "
          f"{gigabytes_per_second(stream.numel() * 4, milliseconds(stream.sum, 5)):.1f} GB/s")
    del stream

    print("\nmatrix multiply, cold weight (F.linear, and the weight on the left: W @ x^T)")
    for in_features, out_features in [(576, 49152), (4096, 16384)]:
        for rows in (1, args.batch):
            linear, left = matmul_rates(in_features, out_features, rows)
            print(f"  {out_features}x{in_features} ({out_features * in_features * 4 / 2**20:.0f} MiB), {rows} "
                  f"row(s): F.linear {linear:.1f} GB/s, W @ x^T {left:.1f} GB/s")

    print(f"\ndecode attention, batch {args.batch}, {args.kv_heads} KV heads x {args.group} query heads, "
          f"head_dim {args.head_dim}, {args.layers} layer(s) read in turn"
          + (", compiled (Inductor)" if args.compile else ""))
    for entries in (int(item) for item in args.entries.split(",")):
        candidates = attention_candidates(args.batch, args.kv_heads, args.group, args.head_dim, entries, args.layers,
                                          args.compile)
        nbytes = 2 * args.batch * args.kv_heads * entries * args.head_dim * 4 * args.layers
        cells = []
        for name, fn in candidates.items():
            ms = milliseconds(fn, max(20 // args.layers, 3))
            cells.append(f"{name} {ms:.2f} ms ({gigabytes_per_second(nbytes, ms):.1f} GB/s)")
        print(f"  {entries} entries ({nbytes / 2**20:.0f} MiB in all; times per pass over the layers): "
              + "; ".join(cells))


if __name__ == "__main__":
    main()
