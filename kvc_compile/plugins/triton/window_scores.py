"""Fused observation-window scoring: the votes every window scorer starts from.

``votes[b, h, j] = sum_i softmax_j(q_i . k_j / sqrt(d))`` over the last ``window`` queries ``i`` of
query head ``h``, in fp32, causal inside the window (query ``n - window + i`` sees keys up to its
own position), padding keys outside the softmax, padding queries voting nothing. SnapKV, LAVa,
PyramidKV, AdaKV and ChunkKV pool these (divided by ``window``), TOVA reads them with ``window=1``.

Two kernels, neither of which writes the ``[heads, window, n]`` attention matrix:

1. ``_row_statistics``: one program per (row, KV head, block of window rows) streams over the keys
   with an online softmax and keeps each row's maximum and normaliser ([b, q_heads, window]).
2. ``_column_votes``: one program per (row, KV head, block of keys) loads its keys once, then for
   every query head of the GQA group and every block of window rows recomputes the logits,
   normalises them with the statistics and sums over the window.

Keys are read twice in all; the reference (``kvc_compile.methods.scoring.window_votes``)
materialises the matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.library import wrap_triton

from kvc_compile.plugins.triton import TRITON_AVAILABLE, require_triton

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from kvc_compile.plugins.triton import exact_dot

    @triton.jit
    def _row_statistics(
        q_ptr, k_ptr, valid_ptr, max_ptr, sum_ptr,
        n, window, group, scale,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        b, kv_head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a symbolic float argument as fp64
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)  # row = g * window + i over the GQA group
        row_ok = rows < group * window
        g, i = rows // window, rows % window
        dims = tl.arange(0, BLOCK_D)
        position = n - window + i  # the query's position in the sequence
        q = tl.load(
            q_ptr + b * stride_qb + (kv_head * group + g)[:, None] * stride_qh + position[:, None] * stride_qn
            + dims[None, :],
            mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0,
        )
        row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = tl.load(
                k_ptr + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + dims[None, :],
                mask=(cols[:, None] < n) & (dims[None, :] < HEAD_DIM), other=0.0,
            )
            key_ok = tl.load(valid_ptr + b * stride_vb + cols, mask=cols < n, other=0) != 0
            logits = exact_dot(q, tl.trans(k)) * scale
            visible = key_ok[None, :] & (cols[None, :] <= position[:, None]) & row_ok[:, None]
            logits = tl.where(visible, logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]), axis=1)
            row_max = new_max
        out = b * group * window * tl.num_programs(1) + kv_head * group * window + rows
        tl.store(max_ptr + out, row_max, mask=row_ok)
        tl.store(sum_ptr + out, row_sum, mask=row_ok)

    @triton.jit
    def _window_block(
        q_ptr, valid_ptr, max_ptr, sum_ptr, k, key_ok, cols, dims, b, head, start,
        n, window, group, scale, stride_qb, stride_qh, stride_qn, stride_vb,
        BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        """Window rows ``start ..`` of query head ``head`` against a block of keys ``k``: the softmax
        probabilities (0 where not visible, and on padding queries), the logits, the rows' index into
        the statistics, and which rows exist."""
        i = start + tl.arange(0, BLOCK_R)
        row_ok = i < window
        position = n - window + i
        q = tl.load(q_ptr + b * stride_qb + head * stride_qh + position[:, None] * stride_qn + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        stats = (b * tl.num_programs(1) * group + head) * window + i
        row_max = tl.load(max_ptr + stats, mask=row_ok, other=0.0)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_sum = tl.load(sum_ptr + stats, mask=row_ok, other=1.0)
        row_sum = tl.where(row_sum > 0, row_sum, 1.0)  # a row that sees no real key votes nothing
        # A padding query (itself invalid) casts no vote, whatever it could see.
        query_ok = tl.load(valid_ptr + b * stride_vb + position, mask=row_ok, other=0) != 0
        logits = exact_dot(q, tl.trans(k)) * scale
        visible = key_ok[None, :] & (cols[None, :] <= position[:, None]) & (row_ok & query_ok)[:, None]
        attention = tl.where(visible, tl.exp(logits - row_max[:, None]) / row_sum[:, None], 0.0)
        return attention, tl.where(visible, logits, 0.0), stats, row_ok

    @triton.jit
    def _column_votes(
        q_ptr, k_ptr, valid_ptr, max_ptr, sum_ptr, out_ptr,
        n, window, group, scale,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        b, kv_head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a symbolic float argument as fp64
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        k = tl.load(
            k_ptr + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + dims[None, :],
            mask=(cols[:, None] < n) & (dims[None, :] < HEAD_DIM), other=0.0,
        )
        key_ok = tl.load(valid_ptr + b * stride_vb + cols, mask=cols < n, other=0) != 0
        for g in range(0, group):
            head = kv_head * group + g
            votes = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, window, BLOCK_R):
                attention, _, _, _ = _window_block(
                    q_ptr, valid_ptr, max_ptr, sum_ptr, k, key_ok, cols, dims, b, head, start,
                    n, window, group, scale, stride_qb, stride_qh, stride_qn, stride_vb, BLOCK_R, HEAD_DIM,
                )
                votes += tl.sum(attention, axis=0)
            tl.store(out_ptr + (b * tl.num_programs(1) * group + head) * n + cols, votes, mask=cols < n)

    @triton.jit
    def _window_outputs(
        q_ptr, k_ptr, v_ptr, valid_ptr, max_ptr, sum_ptr, out_ptr,
        n, window, group, scale,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb,
        stride_valb, stride_valh, stride_valn,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        """``o_i = sum_j A_ij v_j`` of every window row (OBCache's saliency needs them): [b, q_heads, window, d]."""
        b, kv_head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a symbolic float argument as fp64
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < group * window
        g, i = rows // window, rows % window
        dims = tl.arange(0, BLOCK_D)
        position = n - window + i
        head = kv_head * group + g
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + position[:, None] * stride_qn + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
        stats = (b * tl.num_programs(1) * group + head) * window + i
        row_max = tl.load(max_ptr + stats, mask=row_ok, other=0.0)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        row_sum = tl.load(sum_ptr + stats, mask=row_ok, other=1.0)
        row_sum = tl.where(row_sum > 0, row_sum, 1.0)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            entry_ok = (cols[:, None] < n) & (dims[None, :] < HEAD_DIM)
            k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + dims[None, :],
                        mask=entry_ok, other=0.0)
            v = tl.load(v_ptr + b * stride_valb + kv_head * stride_valh + cols[:, None] * stride_valn + dims[None, :],
                        mask=entry_ok, other=0.0)
            key_ok = tl.load(valid_ptr + b * stride_vb + cols, mask=cols < n, other=0) != 0
            logits = exact_dot(q, tl.trans(k)) * scale
            visible = key_ok[None, :] & (cols[None, :] <= position[:, None]) & row_ok[:, None]
            weights = tl.where(visible, tl.exp(logits - row_max[:, None]) / row_sum[:, None], 0.0)
            acc += exact_dot(weights, v)
        tl.store(out_ptr + stats[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM))

    @triton.jit
    def _column_saliency(
        q_ptr, k_ptr, v_ptr, valid_ptr, max_ptr, sum_ptr, o_ptr, out_ptr,
        n, window, group, scale,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb,
        stride_valb, stride_valh, stride_valn,
        VARIANT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        """OBCache's saliency of each key, summed over the window rows of each query head (VARIANT:
        0 value, 1 key, 2 joint), from the logits, the statistics and the rows' outputs."""
        b, kv_head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a symbolic float argument as fp64
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        entry_ok = (cols[:, None] < n) & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + dims[None, :],
                    mask=entry_ok, other=0.0)
        v = tl.load(v_ptr + b * stride_valb + kv_head * stride_valh + cols[:, None] * stride_valn + dims[None, :],
                    mask=entry_ok, other=0.0)
        value_sq = tl.sum(v.to(tl.float32) * v.to(tl.float32), axis=1)  # ||v_j||^2
        key_ok = tl.load(valid_ptr + b * stride_vb + cols, mask=cols < n, other=0) != 0
        for g in range(0, group):
            head = kv_head * group + g
            saliency = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, window, BLOCK_R):
                attention, z, stats, row_ok = _window_block(
                    q_ptr, valid_ptr, max_ptr, sum_ptr, k, key_ok, cols, dims, b, head, start,
                    n, window, group, scale, stride_qb, stride_qh, stride_qn, stride_vb, BLOCK_R, HEAD_DIM,
                )
                attention_sq = attention * attention
                if VARIANT == 0:
                    term = attention_sq * value_sq[None, :]
                else:
                    o = tl.load(o_ptr + stats[:, None] * HEAD_DIM + dims[None, :],
                                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
                    value_dot_output = exact_dot(o, tl.trans(v))  # v_j . o_i
                    output_sq = tl.sum(o * o, axis=1)
                    term = attention_sq * z * z * (value_sq[None, :] + output_sq[:, None] - 2 * value_dot_output)
                    if VARIANT == 2:
                        term += attention_sq * value_sq[None, :]
                        term += 2 * attention_sq * z * (value_sq[None, :] - value_dot_output)
                saliency += tl.sum(term, axis=0)
            tl.store(out_ptr + (b * tl.num_programs(1) * group + head) * n + cols, saliency, mask=cols < n)


def window_votes_triton(
    queries: Tensor, keys: Tensor, valid: Tensor, window: int, block_rows: int = 16, block_keys: int = 128
) -> Tensor:
    """The Triton path of ``kvc_compile.methods.scoring.window_votes``: ``queries`` [b, q_heads, n, d]
    (every query; the last ``window`` vote), ``keys`` [b, kv_heads, n, d], ``valid`` [b, n] bool.

    128-key blocks: 1.4x faster than 64 on an H100 at 32K keys (bf16, head_dim 128)."""
    require_triton()
    batch, q_heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    window = min(window, n)
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    valid = valid.to(torch.int8).contiguous()
    row_max = torch.empty(batch, q_heads, window, device=keys.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    votes = torch.empty(batch, q_heads, n, device=keys.device, dtype=torch.float32)
    common = dict(BLOCK_R=block_rows, BLOCK_N=block_keys, BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim)
    strides = (*queries.stride()[:3], *keys.stride()[:3], valid.stride(0))
    scale = 1.0 / math.sqrt(head_dim)
    grid = (batch, kv_heads, triton.cdiv(group * window, block_rows))
    sizes = (n, window, group, scale, *strides)
    wrap_triton(_row_statistics)[grid](queries, keys, valid, row_max, row_sum, *sizes, **common)
    grid = (batch, kv_heads, triton.cdiv(n, block_keys))
    wrap_triton(_column_votes)[grid](queries, keys, valid, row_max, row_sum, votes, *sizes, **common)
    return votes


VARIANT_CODES = {"v": 0, "k": 1, "kv": 2}


def output_saliency_triton(
    queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, window: int, variant: str,
    block_rows: int = 16, block_keys: int = 64,
) -> Tensor:
    """OBCache's saliency [b, q_heads, n] fp32 of every key for the last ``window`` queries' outputs:
    the fused path of ``output_saliency(window_attention(...), window_logits(...), values, variant)``.

    64-key blocks: at 128, fp32 inputs need more shared memory than an H100 has (~290 KB)."""
    require_triton()
    batch, q_heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    window = min(window, n)
    queries, keys, values = (x if x.stride(-1) == 1 else x.contiguous() for x in (queries, keys, values))
    valid = valid.to(torch.int8).contiguous()
    row_max = torch.empty(batch, q_heads, window, device=keys.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    outputs = torch.zeros(batch, q_heads, window, head_dim, device=keys.device, dtype=torch.float32)
    saliency = torch.empty(batch, q_heads, n, device=keys.device, dtype=torch.float32)
    common = dict(BLOCK_R=block_rows, BLOCK_N=block_keys, BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim)
    sizes = (n, window, group, 1.0 / math.sqrt(head_dim), *queries.stride()[:3], *keys.stride()[:3], valid.stride(0))
    row_grid = (batch, kv_heads, triton.cdiv(group * window, block_rows))
    wrap_triton(_row_statistics)[row_grid](queries, keys, valid, row_max, row_sum, *sizes, **common)
    if variant != "v":
        wrap_triton(_window_outputs)[row_grid](
            queries, keys, values, valid, row_max, row_sum, outputs, *sizes, *values.stride()[:3], **common
        )
    wrap_triton(_column_saliency)[(batch, kv_heads, triton.cdiv(n, block_keys))](
        queries, keys, values, valid, row_max, row_sum, outputs, saliency, *sizes, *values.stride()[:3],
        VARIANT=VARIANT_CODES[variant], **common,
    )
    return saliency
