"""Reading the packed layout: attention of new tokens over a layer whose heads keep different counts.

The reference of the variable-length decode attention (``kvc::packed_attention``; the Triton
kernel is ``kvc_compile.plugins.triton.decode_attention``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_attention_reference(
    query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, kv_heads: int, scaling: float
) -> Tensor:
    """Attention of ``q`` new tokens over a packed layer whose last entries are those tokens.

    ``query`` [batch, q_heads, q, d]; ``keys``/``values`` [batch, 1, T, d]; ``heads`` [batch, 1, T]
    (entry's KV head, -1 for padding). Query head ``h`` reads only the entries of KV head
    ``h // (q_heads / kv_heads)``; the i-th new token does not see the new tokens after it (the
    last ``q * kv_heads`` entries, token-major). Returns [batch, q, q_heads, d] like transformers'
    attention functions. Computed in fp32, returned in the query's dtype.
    """
    batch, q_heads, q_len, _ = query.shape
    owner = heads[:, 0]  # [batch, T]
    total = owner.shape[-1]
    group_of_head = torch.arange(q_heads, device=query.device) // (q_heads // kv_heads)
    visible = owner[:, None, None, :] == group_of_head[None, :, None, None]  # [batch, q_heads, 1, T]
    # Entry t of the new tokens belongs to token (t - first_new) // kv_heads.
    entry_token = (torch.arange(total, device=query.device) - (total - q_len * kv_heads)).div(
        kv_heads, rounding_mode="floor"
    )
    causal = entry_token[None, :] <= torch.arange(q_len, device=query.device)[:, None]  # [q, T]
    logits = torch.einsum("bhqd,btd->bhqt", query.float(), keys[:, 0].float()) * scaling
    weights = logits.masked_fill(~(visible & causal), float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhqt,btd->bhqd", weights, values[:, 0].float())
    return out.transpose(1, 2).to(query.dtype).contiguous()
