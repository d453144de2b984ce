"""Selection and compaction: the ``k`` best entries of each row, gathered in position order.

``select_and_gather_triton(scores, keys, values, k)`` takes scores [b, H, N] (PROTECTED = +inf
and EXCLUDED = -inf included) and keys/values [b, H, N, d] and returns the kept keys, values
[b, H, k, d] and positions [b, H, k], ascending, as ``select_uniform`` followed by
``gather_kept`` does. For head-adaptive budgets (AdaKV's global top-k over a layer's heads) pass
the layer as one row: scores [b, 1, H*N] and entries [b, 1, H*N, d] (the packed layout's flat
index ``head * N + position``).

Two kernels, one program per (row, head) each:

1. ``_kth_largest``: a radix select. Scores are mapped to int32 keys that order like the floats,
   and 32 bisection steps over the key range, each counting the keys above the midpoint, find the
   k-th largest key. Nothing is sorted.
2. ``_compact``: one pass in position order. An entry is kept if its key is above the k-th largest,
   or equal to it and among the first of those ties still needed; running counts (a cumulative
   sum per block) give each kept entry its output slot, where its key and value rows are written.

Ties at the threshold go to the lowest positions, as in ``kvc_compile.methods.selection.top_positions``
(whose PyTorch path is the reference, ``stable_select_reference``): every device keeps the same entries.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from kvc_compile.plugins.triton import TRITON_AVAILABLE, require_triton


def stable_select_reference(scores: Tensor, k: int) -> Tensor:
    """Positions [b, H, k] of the ``k`` best scores per row, ties to the lowest positions, ascending.

    ``top_positions``'s own PyTorch path, called directly: ``top_positions`` hands CUDA scores to
    this file's radix select, which the reference must not be.
    """
    order = scores.float().sort(dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _ordered_keys(x):
        """int32 keys that order like the fp32 values (two's complement trick on the bits); -0 is 0."""
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _count_at_least(scores_ptr, n, threshold, BLOCK_N: tl.constexpr):
        total = tl.full([], 0, tl.int32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            keys = _ordered_keys(tl.load(scores_ptr + cols, mask=cols < n, other=float("-inf")))
            total += tl.sum(((keys >= threshold) & (cols < n)).to(tl.int32), axis=0)
        return total

    @triton.jit
    def _kth_largest(scores_ptr, kth_ptr, n, k, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        scores_ptr += row.to(tl.int64) * n
        # The int32 key range, held in int64 so that low + high cannot overflow.
        low = tl.full([], -2147483648, tl.int64)
        high = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            middle = (low + high + 1) // 2
            enough = _count_at_least(scores_ptr, n, middle, BLOCK_N) >= k
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle - 1)
        tl.store(kth_ptr + row, low.to(tl.int32))

    @triton.jit
    def _compact(
        scores_ptr, kth_ptr, keys_ptr, values_ptr, out_keys_ptr, out_values_ptr, out_positions_ptr,
        n, k, key_dim, value_dim,
        BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GATHER: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        scores_ptr += row * n
        kth = tl.load(kth_ptr + row)
        above = _count_at_least(scores_ptr, n, kth + 1, BLOCK_N)
        ties_needed = k - above
        ties_seen = tl.full([], 0, tl.int32)
        written = tl.full([], 0, tl.int32)
        key_dims, value_dims = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            inside = cols < n
            keys = _ordered_keys(tl.load(scores_ptr + cols, mask=inside, other=float("-inf")))
            tie = (keys == kth) & inside
            tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
            kept = inside & ((keys > kth) | (tie & (tie_rank < ties_needed)))
            slot = written + tl.cumsum(kept.to(tl.int32), axis=0) - kept.to(tl.int32)
            tl.store(out_positions_ptr + row * k + slot, cols.to(tl.int32), mask=kept)
            if GATHER:
                source = row * n + cols
                target = row * k + slot
                key_rows = tl.load(keys_ptr + source[:, None] * key_dim + key_dims[None, :],
                                   mask=kept[:, None] & (key_dims[None, :] < key_dim))
                tl.store(out_keys_ptr + target[:, None] * key_dim + key_dims[None, :], key_rows,
                         mask=kept[:, None] & (key_dims[None, :] < key_dim))
                value_rows = tl.load(values_ptr + source[:, None] * value_dim + value_dims[None, :],
                                     mask=kept[:, None] & (value_dims[None, :] < value_dim))
                tl.store(out_values_ptr + target[:, None] * value_dim + value_dims[None, :], value_rows,
                         mask=kept[:, None] & (value_dims[None, :] < value_dim))
            ties_seen += tl.sum(tie.to(tl.int32), axis=0)
            written += tl.sum(kept.to(tl.int32), axis=0)


# Measured on an H100 (bf16, 8 rows of 32K scores): the select's 33 passes over a row are bound by
# each pass's latency, so wide blocks win (2048: 2.3x faster than 256); compaction gathers
# [block, d] tiles, which at 256 rows take 8 warps to stay out of local memory.
SELECT_BLOCK, SELECT_WARPS, COMPACT_WARPS = 2048, 8, 8


def select_and_gather_triton(
    scores: Tensor, keys: Tensor, values: Tensor, k: int, block: int = 256
) -> tuple[Tensor, Tensor, Tensor]:
    """Kept keys, values [b, H, k, d] and positions [b, H, k] (int32, ascending) of the ``k`` best scores."""
    require_triton()
    batch, heads, n = scores.shape
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}] (the entries per row), got {k}")
    scores = scores.float().contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    rows = batch * heads
    kth = torch.empty(rows, device=scores.device, dtype=torch.int32)
    out_keys = keys.new_empty(batch, heads, k, keys.shape[-1])
    out_values = values.new_empty(batch, heads, k, values.shape[-1])
    positions = torch.empty(batch, heads, k, device=scores.device, dtype=torch.int32)
    wrap_triton(_kth_largest)[(rows,)](scores, kth, n, k, BLOCK_N=SELECT_BLOCK, num_warps=SELECT_WARPS)
    wrap_triton(_compact)[(rows,)](
        scores, kth, keys, values, out_keys, out_values, positions, n, k, keys.shape[-1], values.shape[-1],
        BLOCK_N=block, BLOCK_DK=triton.next_power_of_2(keys.shape[-1]),
        BLOCK_DV=triton.next_power_of_2(values.shape[-1]), GATHER=True, num_warps=COMPACT_WARPS,
    )
    return out_keys, out_values, positions


def top_positions_triton(scores: Tensor, k: int, block: int = 256) -> Tensor:
    """Positions [..., k] (int64, ascending) of the ``k`` best of ``scores`` [..., N]: the selection
    alone (``kvc_compile.methods.selection.top_positions``), e.g. AdaKV's top-k over a layer's heads."""
    require_triton()
    n = scores.shape[-1]
    rows = scores.reshape(-1, n).float().contiguous()
    kth = torch.empty(rows.shape[0], device=scores.device, dtype=torch.int32)
    positions = torch.empty(rows.shape[0], k, device=scores.device, dtype=torch.int32)
    wrap_triton(_kth_largest)[(rows.shape[0],)](rows, kth, n, k, BLOCK_N=SELECT_BLOCK, num_warps=SELECT_WARPS)
    wrap_triton(_compact)[(rows.shape[0],)](
        rows, kth, rows, rows, rows, rows, positions, n, k, 1, 1, BLOCK_N=block, BLOCK_DK=16, BLOCK_DV=16,
        GATHER=False,
    )
    return positions.long().view(*scores.shape[:-1], k)
