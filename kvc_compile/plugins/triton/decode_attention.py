"""Variable-length per-head decode attention over the packed layout.

Layers whose heads keep different numbers of entries (AdaKV, LAVa, PyramidKV, AdaCurDKV) store
one flat run per row, each entry labelled with its KV head (``kvc_compile.methods.base``); the
reference reader is ``kvc::packed_attention`` (``kvc_compile.cache.attention``), which masks a
dense ``[heads, T]`` score matrix.

Here the run is split into chunks, one program per (row, chunk, block of up to 32 query rows)
(flash-decoding's split over the sequence, so a single long row still fills the GPU). A program
reads each of its entries once and scores it against all its query rows at once (one ``tl.dot``);
a query head keeps only the entries labelled with its KV head. Up to 32 query rows (one block), no
entry is read twice; evicted entries cost nothing.
Each program leaves an online-softmax partial (running max, normaliser, weighted values); the
partials of a row's chunks are merged in PyTorch (a few floats per head).

New tokens (the last ``q_len * kv_heads`` entries, token-major) are causal among themselves, as in
the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from kvc_compile.plugins.triton import TRITON_AVAILABLE, require_triton

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from kvc_compile.plugins.triton import exact_dot

    @triton.jit
    def online_softmax_step(logits, v, row_max, row_sum, acc):
        """Fold a block of logits [rows, T] (-inf: not visible) and its values [T, d] into a running
        softmax: the rows' maximum, normaliser and weighted sum of values."""
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp(logits - safe_max[:, None])
        rescale = tl.exp(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + exact_dot(weights, v)
        return new_max, row_sum, acc

    @triton.jit
    def _packed_partials(
        q_ptr, k_ptr, v_ptr, heads_ptr, max_ptr, sum_ptr, acc_ptr,
        total, chunk, q_len, kv_heads, group, rows, scale, head_dim, value_dim,
        stride_qb, stride_qh, stride_qq,
        stride_kb, stride_kt,
        stride_vb, stride_vt,
        stride_hb,
        BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        b, split, row_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a symbolic float argument as fp64
        r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)  # row = query_head * q_len + i
        row_ok = r < rows
        head, i = r // q_len, r % q_len
        dims, value_dims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qq + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < head_dim), other=0.0)
        owner = head // group  # the KV head each query head reads
        first_new = total - q_len * kv_heads
        row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        begin = split * chunk
        for start in range(begin, begin + chunk, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            inside = (t < total) & (t < begin + chunk)
            label = tl.load(heads_ptr + b * stride_hb + t, mask=inside, other=-1)
            k = tl.load(k_ptr + b * stride_kb + t[:, None] * stride_kt + dims[None, :],
                        mask=inside[:, None] & (dims[None, :] < head_dim), other=0.0)
            v = tl.load(v_ptr + b * stride_vb + t[:, None] * stride_vt + value_dims[None, :],
                        mask=inside[:, None] & (value_dims[None, :] < value_dim), other=0.0)
            token = tl.where(t >= first_new, (t - first_new) // kv_heads, -1)
            visible = (label[None, :] == owner[:, None]) & (token[None, :] <= i[:, None]) & row_ok[:, None]
            logits = tl.where(visible, exact_dot(q, tl.trans(k)) * scale, float("-inf"))
            row_max, row_sum, acc = online_softmax_step(logits, v, row_max, row_sum, acc)
        partial = (b * tl.num_programs(1) + split) * rows + r
        tl.store(max_ptr + partial, row_max, mask=row_ok)
        tl.store(sum_ptr + partial, row_sum, mask=row_ok)
        tl.store(acc_ptr + partial[:, None] * value_dim + value_dims[None, :], acc,
                 mask=row_ok[:, None] & (value_dims[None, :] < value_dim))


def merge_partials(row_max: Tensor, row_sum: Tensor, acc: Tensor) -> Tensor:
    """Combine per-chunk online-softmax partials ([b, splits, rows(, d)]) into [b, rows, d]."""
    best = row_max.amax(dim=1, keepdim=True)
    scale = torch.exp(row_max - best.clamp(min=torch.finfo(torch.float32).min)).nan_to_num(0.0)
    total = (row_sum * scale).sum(dim=1)
    return (acc * scale[..., None]).sum(dim=1) / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]


def packed_attention_triton(
    query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, kv_heads: int, scaling: float, chunk: int = 256
) -> Tensor:
    """The Triton path of ``kvc::packed_attention``: same arguments, [batch, q_len, q_heads, d_v] out."""
    require_triton()
    batch, q_heads, q_len, head_dim = query.shape
    total, value_dim = keys.shape[2], values.shape[-1]
    rows = q_heads * q_len
    splits = max(triton.cdiv(total, chunk), 1)
    keys, values, heads = keys[:, 0], values[:, 0], heads[:, 0].contiguous()
    row_max = torch.empty(batch, splits, rows, device=query.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    acc = torch.empty(batch, splits, rows, value_dim, device=query.device, dtype=torch.float32)
    # At most 32 rows (query heads x new tokens) a program: more overflow the shared memory with
    # fp32 inputs (tf32x3 operands) and spill registers; further rows go to more programs.
    block_rows = min(max(triton.next_power_of_2(rows), 16), 32)
    wrap_triton(_packed_partials)[(batch, splits, triton.cdiv(rows, block_rows))](
        query, keys, values, heads, row_max, row_sum, acc,
        total, chunk, q_len, kv_heads, q_heads // kv_heads, rows, scaling, head_dim, value_dim,
        *query.stride()[:3], *keys.stride()[:2], *values.stride()[:2], heads.stride(0),
        BLOCK_R=block_rows, BLOCK_T=64,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_DV=triton.next_power_of_2(value_dim),
    )
    out = merge_partials(row_max, row_sum, acc)  # [b, q_heads * q_len, d_v], row = head * q_len + i
    return out.view(batch, q_heads, q_len, value_dim).transpose(1, 2).to(query.dtype).contiguous()
