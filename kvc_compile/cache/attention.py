"""The ``"kvc"`` attention implementation: SDPA for dense caches, a packed-layout reader otherwise.

Registered through transformers' ``AttentionInterface`` (the library's extension point), so
``from_pretrained(..., attn_implementation="kvc")`` selects it without editing model code. Prefill
and dense layers call transformers' own SDPA function, so the kvc pass sees the usual SDPA site.
Packed layers (per-head or per-layer budgets) arrive as ``CachedKeys`` with head labels and are
read by ``packed_attention``, the pure-PyTorch reference of the variable-length decode attention.
Low-rank layers (KQ-SVD) arrive as ``CachedKeys`` with factors: each query is projected by its KV
head's ``B`` (``q B . k A ~ q . k``, the softmax scale stays the full head's), attention runs over
the rank-R entries, and each head's output is lifted back by ``B_v^T`` before ``o_proj``
(``kvc::lowrank_lift``, which compiled decode graphs fold into ``o_proj``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvc_compile.cache import CachedKeys
from kvc_compile.compression.layout import valid_keys_from_mask
from kvc_compile.ops.kernels import lowrank_decode_attention, packed_attention, use_kernels
from kvc_compile.ops.lowrank import lowrank_lift

ATTENTION_IMPLEMENTATION = "kvc"


def per_kv_head(x: Tensor, factor: Tensor, equation: str) -> Tensor:
    """Apply each KV head's ``factor`` [kv_heads, d, r] to its group's query heads of ``x`` [b, H, q, .]."""
    batch, q_heads, q_len, _ = x.shape
    kv_heads = factor.shape[0]
    grouped = x.reshape(batch, kv_heads, q_heads // kv_heads, q_len, x.shape[-1])
    return torch.einsum(equation, grouped, factor.to(x.dtype)).reshape(batch, q_heads, q_len, -1)


def kvc_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    if not isinstance(key, CachedKeys):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if key.key_up is not None and key.heads is None and query.shape[2] == 1 and use_kernels(query):
        # GPU decoding over a dense rank-R cache: one kernel projects the queries and attends.
        valid = valid_keys_from_mask(attention_mask, query.shape[0], key.keys.shape[2], query.device)
        out = lowrank_decode_attention(query, key.key_up, key.keys, value, valid, float(scaling))
        fold = key.output_fold if key.output_fold is not None else out.new_empty(0, 0)
        return lowrank_lift(out, key.value_up, fold), None
    if key.key_up is not None:  # low rank: score in the R-dimensional space
        query = per_kv_head(query, key.key_up, "bkgqd,kdr->bkgqr")
    if key.heads is not None:
        kv_heads = module.config.num_key_value_heads
        out = packed_attention(query, key.keys, value, key.heads, kv_heads, float(scaling))
    else:
        out, _ = sdpa_attention_forward(module, query, key.keys, value, attention_mask, scaling=scaling, **kwargs)
    if key.value_up is not None:  # lift each head's rank-R_v output back to head_dim (folded when compiled)
        fold = key.output_fold if key.output_fold is not None else out.new_empty(0, 0)
        out = lowrank_lift(out, key.value_up, fold)
    return out, None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, kvc_attention)
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
