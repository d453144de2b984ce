"""KQ-SVD kernels: RoPE and the rank-R projection in one pass, and decode attention over rank-R keys.

``rope_lowrank_project_triton(k, cos, sin, down)`` rotates pre-RoPE keys ``k`` [b, kv, q, d]
(tables cos/sin [b, 1, q, d]) and
projects them by their KV head's ``A`` [kv, d, R] in registers, writing only the [b, kv, q, R]
entries the cache stores (reference: ``rope_lowrank_project_reference``).

``lowrank_decode_attention_triton(query, key_up, keys, values, valid, scaling)`` is one decoding
step over a dense rank-R cache: each program projects its GQA group's queries by ``B`` [d, R]
(``q B . k A ~ q . k``), then runs an online softmax over a chunk of the rank-R keys and values;
the chunks' partials are merged as in ``decode_attention``. The output stays at rank ``R_v`` (the
caller lifts it back, or ``o_proj`` has ``B_v`` folded in). Reference:
``lowrank_decode_attention_reference``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from kvc_compile.compression.lowrank import project_entries
from kvc_compile.methods.rotary import rotate_half
from kvc_compile.plugins.triton import TRITON_AVAILABLE, require_triton
from kvc_compile.plugins.triton.decode_attention import merge_partials

if TRITON_AVAILABLE:
    from kvc_compile.plugins.triton import exact_dot
    from kvc_compile.plugins.triton.decode_attention import online_softmax_step


def rope_lowrank_project_reference(keys: Tensor, cos: Tensor, sin: Tensor, down: Tensor) -> Tensor:
    """``(k cos + rotate_half(k) sin) A``: keys [b, kv, q, d], cos/sin [b, 1, q, d] (as transformers
    applies them), down [kv, d, R]. The same arithmetic as the model's RoPE, then the projection."""
    rotated = keys * cos + rotate_half(keys) * sin
    return project_entries(rotated, None, down)


def lowrank_decode_attention_reference(
    query: Tensor, key_up: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scaling: float
) -> Tensor:
    """query [b, H, 1, d], key_up [kv, d, R], keys [b, kv, T, R], values [b, kv, T, R_v], valid [b, T]
    -> [b, 1, H, R_v]: softmax(q B K^T * scaling) V over the valid keys, fp32, in the query's dtype."""
    batch, q_heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    projected = torch.einsum("bkgd,kdr->bkgr", grouped, key_up.float())
    logits = torch.einsum("bkgr,bktr->bkgt", projected, keys.float()) * scaling
    weights = logits.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = torch.einsum("bkgt,bktv->bkgv", weights, values.float())
    return out.reshape(batch, 1, q_heads, -1).to(query.dtype)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_project(
        k_ptr, cos_ptr, sin_ptr, down_ptr, out_ptr,
        q_len, half, rank,
        stride_kb, stride_kh, stride_kq,
        stride_cb, stride_cq,
        stride_ob, stride_oh, stride_oq,
        BLOCK_Q: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        b, kv_head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tokens = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims, ranks = tl.arange(0, BLOCK_HALF), tl.arange(0, BLOCK_R)
        ok = (tokens[:, None] < q_len) & (dims[None, :] < half)
        rows = b * stride_kb + kv_head * stride_kh + tokens[:, None] * stride_kq
        table = b * stride_cb + tokens[:, None] * stride_cq
        k1 = tl.load(k_ptr + rows + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + rows + half + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        cos1 = tl.load(cos_ptr + table + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + half + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + half + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        # rotate_half(k) = (-k2, k1)
        rotated1 = k1 * cos1 - k2 * sin1
        rotated2 = k2 * cos2 + k1 * sin2
        factor = down_ptr + kv_head * 2 * half * rank
        factor_ok = (dims[:, None] < half) & (ranks[None, :] < rank)
        down1 = tl.load(factor + dims[:, None] * rank + ranks[None, :], mask=factor_ok, other=0.0).to(tl.float32)
        down2 = tl.load(factor + (half + dims[:, None]) * rank + ranks[None, :], mask=factor_ok, other=0.0)
        projected = exact_dot(rotated1, down1)
        projected += exact_dot(rotated2, down2)
        out = out_ptr + b * stride_ob + kv_head * stride_oh + tokens[:, None] * stride_oq + ranks[None, :]
        tl.store(out, projected.to(out_ptr.dtype.element_ty), mask=(tokens[:, None] < q_len) & (ranks[None, :] < rank))

    @triton.jit
    def _lowrank_decode_partials(
        q_ptr, up_ptr, k_ptr, v_ptr, valid_ptr, max_ptr, sum_ptr, acc_ptr,
        total, chunk, group, head_dim, rank, value_rank, scale,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_valid,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RV: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a symbolic float argument as fp64
        g = tl.arange(0, BLOCK_G)
        dims, ranks, value_ranks = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_RV)
        heads = kv_head * group + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=(g[:, None] < group) & (dims[None, :] < head_dim), other=0.0)
        up = tl.load(up_ptr + kv_head * head_dim * rank + dims[:, None] * rank + ranks[None, :],
                     mask=(dims[:, None] < head_dim) & (ranks[None, :] < rank), other=0.0).to(tl.float32)
        projected = exact_dot(q, up)  # [G, R]: the group's queries in the rank-R space
        row_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
        begin = split * chunk
        for start in range(begin, begin + chunk, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            inside = (t < total) & (t < begin + chunk)
            key_ok = tl.load(valid_ptr + b * stride_valid + t, mask=inside, other=0) != 0
            k = tl.load(k_ptr + b * stride_kb + kv_head * stride_kh + t[:, None] * stride_kt + ranks[None, :],
                        mask=inside[:, None] & (ranks[None, :] < rank), other=0.0)
            v = tl.load(v_ptr + b * stride_vb + kv_head * stride_vh + t[:, None] * stride_vt + value_ranks[None, :],
                        mask=inside[:, None] & (value_ranks[None, :] < value_rank), other=0.0)
            visible = key_ok[None, :] & inside[None, :] & (g[:, None] < group)
            logits = tl.where(visible, exact_dot(projected, tl.trans(k)) * scale, float("-inf"))
            row_max, row_sum, acc = online_softmax_step(logits, v, row_max, row_sum, acc)
        rows = tl.num_programs(1) * group
        partial = (b * tl.num_programs(2) + split) * rows + heads
        row_ok = g < group
        tl.store(max_ptr + partial, row_max, mask=row_ok)
        tl.store(sum_ptr + partial, row_sum, mask=row_ok)
        tl.store(acc_ptr + partial[:, None] * value_rank + value_ranks[None, :], acc,
                 mask=row_ok[:, None] & (value_ranks[None, :] < value_rank))


def rope_lowrank_project_triton(keys: Tensor, cos: Tensor, sin: Tensor, down: Tensor) -> Tensor:
    """The Triton path of ``rope_lowrank_project_reference`` (same arguments and result)."""
    require_triton()
    batch, kv_heads, q_len, head_dim = keys.shape
    rank = down.shape[-1]
    keys, down = keys.contiguous(), down.contiguous()
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [b, q, d]
    out = keys.new_empty(batch, kv_heads, q_len, rank)
    block_q = 16
    wrap_triton(_rope_project)[(batch, kv_heads, triton.cdiv(q_len, block_q))](
        keys, cos, sin, down, out, q_len, head_dim // 2, rank,
        *keys.stride()[:3], *cos.stride()[:2], *out.stride()[:3],
        BLOCK_Q=block_q, BLOCK_HALF=max(triton.next_power_of_2(head_dim // 2), 16),
        BLOCK_R=max(triton.next_power_of_2(rank), 16),
    )
    return out


def lowrank_decode_attention_triton(
    query: Tensor, key_up: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scaling: float, chunk: int = 256
) -> Tensor:
    """The Triton path of ``lowrank_decode_attention_reference`` (same arguments and result)."""
    require_triton()
    batch, q_heads, _, head_dim = query.shape
    kv_heads, total, rank = keys.shape[1], keys.shape[2], keys.shape[3]
    value_rank = values.shape[-1]
    group = q_heads // kv_heads
    splits = max(triton.cdiv(total, chunk), 1)
    query, key_up = query.contiguous(), key_up.contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    valid = valid.to(torch.int8).contiguous()
    row_max = torch.empty(batch, splits, q_heads, device=query.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    acc = torch.empty(batch, splits, q_heads, value_rank, device=query.device, dtype=torch.float32)
    wrap_triton(_lowrank_decode_partials)[(batch, kv_heads, splits)](
        query, key_up, keys, values, valid, row_max, row_sum, acc,
        total, chunk, group, head_dim, rank, value_rank, scaling,
        query.stride(0), query.stride(1), *keys.stride()[:3], *values.stride()[:3], valid.stride(0),
        BLOCK_G=max(triton.next_power_of_2(group), 16), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_R=max(triton.next_power_of_2(rank), 16), BLOCK_RV=max(triton.next_power_of_2(value_rank), 16),
        BLOCK_T=64,
    )
    return merge_partials(row_max, row_sum, acc).unsqueeze(1).to(query.dtype)
