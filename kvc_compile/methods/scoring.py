"""Scoring maths several methods share: the observation window's logits, attention and votes
(SnapKV and the methods built on its window), and OBCache's output saliency.

``window_votes`` and ``window_output_saliency`` are the references of fused Triton kernels
(``kvc_compile.plugins.triton.window_scores``); scorers call them through ``ScoreInputs`` so an op
can hand in the kernels on the GPU (``kvc_compile.methods.kernels``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def window_logits(queries: Tensor, keys: Tensor, window_size: int) -> Tensor:
    """Logits ``q_i.k_j / sqrt(d)`` of the last ``window_size`` queries over all keys, unmasked,
    [batch, q_heads, window, n] fp32. KV heads are repeated lazily through a grouped view."""
    batch, q_heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    window = queries[:, :, n - window_size :].float().view(batch, kv_heads, q_heads // kv_heads, window_size, head_dim)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", window, keys.float())
    return logits.reshape(batch, q_heads, window_size, n) / math.sqrt(head_dim)


def window_attention(queries: Tensor, keys: Tensor, valid: Tensor, window_size: int) -> Tensor:
    """Attention of the last ``window_size`` queries over all keys, fp32, causal inside the window.

    Returns [batch, q_heads, window, n]; padding keys get zero weight and padding queries a zero row.
    """
    n = queries.shape[2]
    logits = window_logits(queries, keys, window_size)
    query_pos = torch.arange(n - window_size, n, device=keys.device)
    key_pos = torch.arange(n, device=keys.device)
    visible = (key_pos[None, :] <= query_pos[:, None])[None, None] & valid[:, None, None, :]
    weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    # A padding query may see no real key at all (softmax of nothing is NaN): zero it, not multiply it.
    query_valid = valid[:, n - window_size :]
    return weights.masked_fill(~query_valid[:, None, :, None], 0.0)


def window_votes(queries: Tensor, keys: Tensor, valid: Tensor, window_size: int) -> Tensor:
    """Attention of the last ``window_size`` queries summed over them: [batch, q_heads, n] fp32.

    The reference of the fused Triton kernel (``kvc_compile.plugins.triton.window_scores``), which
    never materialises the window's attention matrix; scorers read it through
    ``ScoreInputs.window_votes`` so the kernel can stand in for it on the GPU.
    """
    return window_attention(queries, keys, valid, min(window_size, keys.shape[2])).sum(dim=2)


def output_saliency(attention: Tensor, logits: Tensor, values: Tensor, variant: str) -> Tensor:
    """OBD saliency of every key for the voting queries' outputs, summed over them: [batch, q_heads, n].

    ``attention``/``logits`` [batch, q_heads, window, n]; ``values`` [batch, kv_heads, n, d].
    """
    batch, q_heads, window, n = attention.shape
    kv_heads = values.shape[1]
    group = q_heads // kv_heads
    values = values.float()
    value_sq = values.square().sum(dim=-1)[:, :, None, None, :]  # ||v_j||^2, broadcast over group and queries
    grouped = attention.view(batch, kv_heads, group, window, n)
    attention_sq = grouped.square()
    if variant == "v":
        return (attention_sq.sum(dim=3) * value_sq[:, :, :, 0]).reshape(batch, q_heads, n)
    outputs = torch.einsum("bhgwn,bhnd->bhgwd", grouped, values)  # o_i
    value_dot_output = torch.einsum("bhgwd,bhnd->bhgwn", outputs, values)  # v_j . o_i
    output_sq = outputs.square().sum(dim=-1, keepdim=True)  # ||o_i||^2
    z = logits.view(batch, kv_heads, group, window, n)
    # ||v_j - o_i||^2 expanded, so no [window, n, d] difference tensor is built.
    key_term = attention_sq * z.square() * (value_sq + output_sq - 2 * value_dot_output)
    if variant == "k":
        return key_term.sum(dim=3).reshape(batch, q_heads, n)
    cross = 2 * attention_sq * z * (value_sq - value_dot_output)
    return (attention_sq * value_sq + key_term + cross).sum(dim=3).reshape(batch, q_heads, n)


def window_output_saliency(
    queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, window: int, variant: str
) -> Tensor:
    """``output_saliency`` of the last ``window`` queries (the reference of the fused Triton kernel,
    ``kvc_compile.plugins.triton.window_scores.output_saliency_triton``)."""
    window = min(window, keys.shape[2])
    # A padding query that sees only padding has a 0/0 softmax row: it casts no vote.
    attention = window_attention(queries, keys, valid, window)
    return output_saliency(attention, window_logits(queries, keys, window), values, variant)


def output_l1_norms(values: Tensor, output_weight: Tensor) -> Tensor:
    """``‖W_O^h v_j‖₁``: the L1 norm of what value ``j`` adds to the residual stream through query head
    ``h``'s slice of the output projection, averaged over each KV head's query heads.

    ``values`` [batch, kv_heads, n, d]; ``output_weight`` [hidden, q_heads * d] (``o_proj.weight``).
    Returns [batch, kv_heads, n] fp32. One query head at a time, so the intermediate stays
    [batch, n, hidden].
    """
    batch, kv_heads, n, head_dim = values.shape
    q_heads = output_weight.shape[1] // head_dim
    values = values.float()
    weight = output_weight.float().reshape(output_weight.shape[0], q_heads, head_dim)
    group = q_heads // kv_heads
    per_query_head = torch.stack(
        [(values[:, head // group] @ weight[:, head].T).abs().sum(-1) for head in range(q_heads)], dim=1
    )  # [batch, q_heads, n]
    return per_query_head.view(batch, kv_heads, group, n).mean(dim=2)
