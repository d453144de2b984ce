"""Decode-time eviction: bring a grown layer back to its target, scored by the method.

A layer that compresses while decoding keeps a rolling buffer of the queries of its most recent
tokens (``kvc::last_queries`` / ``kvc::shift_in``); the method scores the whole layer with that
buffer standing as the newest queries. Dense layers are evicted per KV head (``evict_dense``);
packed layers are unpacked into one row per (row, KV head) and re-shared between heads as the
method's selection shares them at prefill (``evict_packed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.compression.layout import INDEX_DTYPE, gather_kept, unpack_per_head, valid_keys_from_mask
from kvc_compile.methods.base import Method, ScoreInputs
from kvc_compile.methods.rotary import rotary_tables_back, rotary_tables_before
from kvc_compile.methods.selection import EXCLUDED

# The newest tokens' rotary tables cos/sin [batch, 1, q, d] and the model's inverse frequencies [d/2].
Rotary = tuple[Tensor, Tensor, Tensor]


def decode_score_inputs(
    method: Method,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    positions: Tensor,
    layer_idx: int,
    n_layers: int,
    rotary: Rotary | None,
) -> ScoreInputs:
    """What a scorer reads of a layer of ``m`` entries per row while decoding.

    The buffer of recent queries stands as the queries of the newest entries (a window the scorer
    reads is always kept, so they line up), earlier queries as zeros it never reads
    (``Method.queries_read``; ``ScoreInputs.query_valid`` marks the buffer's rows). Scorers of
    pre-RoPE queries also get ``rotary``: the newest tokens' cos/sin tables and the inverse
    frequencies, from which the tables of the buffer's positions are counted back. Rows of
    ``keys`` may be (row, KV head) pairs of a packed layer: the tables are repeated to match.
    """
    m = keys.shape[2]
    window = buffer.shape[2]
    queries = F.pad(buffer, (0, 0, m - window, 0)) if m >= window else buffer[:, :, window - m :]
    query_valid = valid & (torch.arange(m, device=keys.device) >= m - window)
    cos = sin = key_tables = None
    if method.needs_rotary:
        if rotary is None:
            raise ValueError(f"{method.name} un-rotates queries or keys while decoding and needs the rotary "
                             f"tables of the newest tokens and the inverse frequencies")
        step_cos, step_sin, inv_freq = rotary
        rows_per_table = keys.shape[0] // step_cos.shape[0]
        step_cos, step_sin = (table.repeat_interleave(rows_per_table, 0) for table in (step_cos, step_sin))
        cos, sin = rotary_tables_before(step_cos, step_sin, inv_freq, m)
        if method.unrotates_keys:
            # The newest entry holds the step's token: each entry is that many positions before it.
            key_tables = rotary_tables_back(step_cos, step_sin, inv_freq, positions[..., -1:] - positions)
    return ScoreInputs(queries, keys, values, valid, layer_idx, n_layers, cos, sin, query_valid=query_valid,
                       positions=positions, key_tables=key_tables)


def evict_dense(
    method: Method,
    target: int,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    attn_mask: Tensor | None,
    layer_idx: int,
    n_layers: int,
    rotary: Rotary | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bring a dense layer of ``m`` entries back to ``target`` per KV head, scored as
    ``decode_score_inputs`` says. Returns kept keys, values and positions, in cache order."""
    batch, _, m, _ = keys.shape
    valid = valid_keys_from_mask(attn_mask, batch, m, keys.device)
    inputs = decode_score_inputs(method, buffer, keys, values, valid, positions, layer_idx, n_layers, rotary)
    kept = method.select(method.score(inputs), valid, target)
    return gather_kept(keys, kept), gather_kept(values, kept), positions.gather(2, kept).to(INDEX_DTYPE)


def evict_packed(
    method: Method,
    target: int,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    heads: Tensor,
    positions: Tensor,
    kv_heads: int,
    layer_idx: int,
    n_layers: int,
    rotary: Rotary | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bring a packed layer (``keys`` [batch, 1, T, d], ``heads``/``positions`` [batch, 1, T]) back to
    ``kv_heads * target`` entries per row, shared between heads as the method's selection shares
    them at prefill (AdaKV: by score, with a per-head floor).

    Each head's entries are unpacked into a row of their own, right-aligned like a left-padded batch,
    and the (row, head) pairs are scored as rows of one KV head each, with the buffered queries of
    that head's GQA group. Returns kept keys, values, heads and positions, in the packed layout.
    """
    batch, _, total, _ = keys.shape
    slot, valid = unpack_per_head(heads, kv_heads)

    def per_head(x: Tensor) -> Tensor:  # [batch, 1, T, *] -> [batch * kv_heads, 1, T, *]
        rows = x.new_zeros(batch, (kv_heads + 1) * total, *x.shape[3:])
        index = slot.view(batch, total, *[1] * (x.dim() - 3)).expand(batch, total, *x.shape[3:])
        rows = rows.scatter(1, index, x[:, 0])
        return rows.view(batch, kv_heads + 1, total, *x.shape[3:])[:, :kv_heads].reshape(
            batch * kv_heads, 1, total, *x.shape[3:])

    q_heads = buffer.shape[1]
    grouped = buffer.reshape(batch * kv_heads, q_heads // kv_heads, *buffer.shape[2:])
    inputs = decode_score_inputs(method, grouped, per_head(keys), per_head(values), valid.reshape(-1, total),
                                 per_head(positions), layer_idx, n_layers, rotary)
    scores = method.score(inputs).reshape(batch, kv_heads, total).float().masked_fill(~valid, EXCLUDED)
    # Validity is per head here, already in the scores; ``select`` masks per row.
    flat = method.select(scores, torch.ones_like(valid[:, 0]), target)  # head * T + slot, ascending

    def gather(x: Tensor) -> Tensor:  # [batch * kv_heads, 1, T, *] -> the kept [batch, 1, kept, *]
        rows = x.reshape(batch, kv_heads * total, *x.shape[3:])
        index = flat.view(*flat.shape, *[1] * (x.dim() - 3)).expand(*flat.shape, *x.shape[3:])
        return rows.gather(1, index).unsqueeze(1)

    kept_heads = (flat // total).masked_fill(~valid.reshape(batch, -1).gather(1, flat), -1)
    return (gather(inputs.keys), gather(inputs.values), kept_heads.to(heads.dtype).unsqueeze(1),
            gather(inputs.positions).to(INDEX_DTYPE))
