"""The compressed cache's layouts: what a layer holds after compression.

* ``dense``: every KV head keeps the same number of tokens: keys ``[batch, kv_heads, k, d]``.
* ``packed``: heads (or layers) keep different counts. A layer stores its entries flattened,
  keys ``[batch, 1, T, d]`` with ``T = kv_heads * k`` per row, and ``heads [batch, 1, T]`` says which
  KV head each entry belongs to (-1 for a padding slot nobody may attend to). Nothing is padded
  per head, so the memory of evicted entries is really freed; the ``"kvc"`` attention
  (``kvc_compile.cache.attention``) reads this layout at decode time.

Every layer also records each entry's prompt position (``positions``) and KV head (``heads``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Entry positions and heads: int32 keeps their overhead at 8 bytes per cached entry.
INDEX_DTYPE = torch.int32


class CompressedKV(NamedTuple):
    """One layer after compression. ``positions``: prompt position of each kept entry; ``heads``:
    its KV head (-1: a padding slot in the packed layout). Dense: [b, h, k(, d)]; packed: [b, 1, T(, d)]."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    heads: Tensor


def gather_kept(tensor: Tensor, kept: Tensor) -> Tensor:
    """Gather [batch, kv_heads, n, d] along the token axis with [batch, kv_heads, k] indices."""
    return tensor.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def dense_heads(kept: Tensor) -> Tensor:
    """The KV head of each entry of a dense selection [batch, kv_heads, k]."""
    kv_heads = kept.shape[1]
    return torch.arange(kv_heads, device=kept.device, dtype=INDEX_DTYPE)[:, None].expand_as(kept).clone()


def keep_dense(keys: Tensor, values: Tensor, kept: Tensor) -> CompressedKV:
    """The dense layout of the entries ``kept`` [batch, kv_heads, k] (positions, ascending)."""
    return CompressedKV(gather_kept(keys, kept), gather_kept(values, kept), kept.to(INDEX_DTYPE), dense_heads(kept))


def prefill_entries(batch: int, kv_heads: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions and heads of an uncompressed dense cache: [batch, kv_heads, n] each."""
    positions = torch.arange(n, device=device, dtype=INDEX_DTYPE).expand(batch, kv_heads, n).clone()
    heads = torch.arange(kv_heads, device=device, dtype=INDEX_DTYPE)[:, None].expand(batch, kv_heads, n).clone()
    return positions, heads


def pack_entries(keys: Tensor, values: Tensor, flat: Tensor, valid: Tensor) -> CompressedKV:
    """The packed layout of the entries ``flat`` [batch, T] (``head * n + position``; -1 pads a row).

    Entries at padding positions, and the -1 slots of rows that keep fewer than ``T``, get head -1:
    no head attends to them.
    """
    batch, kv_heads, n, _ = keys.shape
    slot = flat.clamp(min=0)
    heads, positions = slot // n, slot % n
    heads = heads.masked_fill(~valid.gather(1, positions) | (flat < 0), -1)

    def pack(x: Tensor) -> Tensor:
        rows = x.reshape(batch, kv_heads * n, x.shape[-1])
        return rows.gather(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1])).unsqueeze(1)

    positions, heads = positions.to(INDEX_DTYPE).unsqueeze(1), heads.to(INDEX_DTYPE).unsqueeze(1)
    return CompressedKV(pack(keys), pack(values), positions, heads)


def unpack_per_head(heads: Tensor, kv_heads: int) -> tuple[Tensor, Tensor]:
    """Where each entry of a packed row goes when every KV head's entries are laid out in a row of its
    own, right-aligned, in run order (ascending positions), so every head's newest entries end its row.

    ``heads`` [batch, 1, T] (-1: padding). Returns ``slot`` [batch, T], an index into [batch, (kv_heads + 1)
    * T] (row ``kv_heads`` takes the padding entries), and ``valid`` [batch, kv_heads, T] (False left
    of a head's entries).
    """
    total = heads.shape[-1]
    owner = heads[:, 0].long().masked_fill(heads[:, 0] < 0, kv_heads)
    member = owner[..., None] == torch.arange(kv_heads + 1, device=heads.device)  # [batch, T, kv_heads + 1]
    count = member.sum(1)  # [batch, kv_heads + 1]
    rank = member.long().cumsum(1).gather(2, owner[..., None])[..., 0] - 1
    slot = owner * total + total - count.gather(1, owner) + rank
    valid = torch.arange(total, device=heads.device) >= total - count[:, :kv_heads, None]
    return slot, valid


def valid_keys_from_mask(attn_mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """[batch, n] bool: False where the key is padding.

    Read from the mask row of the last query: with left padding (what generation uses) that query
    is a real token and sees every real key. Boolean masks mark allowed keys with True, additive
    masks with 0 (and the dtype's minimum or -inf elsewhere).
    """
    if attn_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    last_row = attn_mask[:, 0, -1, :n]
    if last_row.dtype != torch.bool:
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    return last_row.expand(batch, n)
