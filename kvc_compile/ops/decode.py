"""Ops for compression while decoding: recent queries, entry positions, and the decode-time eviction.

A layer of ``CompressedCache`` keeps a rolling buffer of the post-RoPE queries of its most recent
tokens, which decode-time scorers vote with. The cache cannot see queries (transformers hands it
keys and values only), so it calls two markers the kvc pass rewires where a buffer is wanted:
``kvc::recent_queries`` at prefill (nothing recorded: an empty tensor) becomes
``kvc::last_queries(query, W)``, and ``kvc::push_query`` at each decode step (the buffer
unchanged) becomes ``kvc::shift_in(buffer, query)``. The eager reference fills the same buffer
from captured queries.

``kvc::append_positions`` records the logical position of every decoded entry, so a layer knows
which token each entry holds after decode-time eviction too. ``kvc::compress_decode`` is that
eviction: the method's scorer over the whole layer, fed the buffer as the newest queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.config import CompressionConfig
from kvc_compile.methods.base import (
    EXCLUDED,
    INDEX_DTYPE,
    ScoreInputs,
    gather_kept,
    rotary_tables_back,
    rotary_tables_before,
)
from kvc_compile.ops.compress import valid_keys_from_mask
from kvc_compile.ops.kernels import score_kernels


@torch.library.custom_op("kvc::recent_queries", mutates_args=())
def recent_queries(key_states: Tensor) -> Tensor:
    """What a fresh layer records of its prompt's queries when nothing asks for them: [batch, 0, 0, d]."""
    return key_states.new_empty(key_states.shape[0], 0, 0, key_states.shape[-1])


@recent_queries.register_fake
def _(key_states):
    return key_states.new_empty(key_states.shape[0], 0, 0, key_states.shape[-1])


def _no_entries(states: Tensor) -> Tensor:
    return states.new_empty(*states.shape[:2], 0, states.shape[-1])


@torch.library.custom_op("kvc::prompt_kv", mutates_args=())
def prompt_kv(key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
    """What a fresh layer keeps of its full prompt besides its cache: nothing ([batch, kv_heads, 0, d]).

    The pass rewires it to the uncompressed prompt entries for LAQ, whose second stage re-scores them.
    """
    return _no_entries(key_states), _no_entries(value_states)


@prompt_kv.register_fake
def _(key_states, value_states):
    return _no_entries(key_states), _no_entries(value_states)


@torch.library.custom_op("kvc::refuse_stage1_decoding", mutates_args=())
def refuse_stage1_decoding(positions: Tensor) -> Tensor:
    """Decoding a LAQ-prefilled cache outside ``lookahead_generate``: fail with the fix."""
    raise RuntimeError(
        "kvc: this cache was prefilled for LAQ, whose pseudo-token rollout and second stage run in "
        "kvc_compile.lookahead_generate(model, input_ids, options, max_new_tokens); decoding it directly "
        "(e.g. with model.generate) would keep only the stage-1 selection"
    )


@refuse_stage1_decoding.register_fake
def _(positions):
    return torch.empty_like(positions)


@torch.library.custom_op("kvc::lookahead_stage2", mutates_args=())
def lookahead_stage2(
    keys: Tensor, values: Tensor, recent_queries: Tensor, prompt_mask: Tensor, pseudo_valid: Tensor, spec: str
) -> tuple[Tensor, Tensor, Tensor]:
    """LAQ's stage 2 on one layer as an op (``kvc_compile.lookahead.stage2_entries``): kept keys,
    values and positions. An engine's stage-2 program calls it, so the kept count stays a formula
    of the prompt length instead of a traced constant."""
    from kvc_compile.lookahead import stage2_entries  # the lookahead loop imports the cache, which imports this

    config = CompressionConfig.from_spec(spec)
    kept = stage2_entries(config, keys, values, recent_queries, prompt_mask, pseudo_valid)
    fresh = torch.contiguous_format  # the fake kernel's layout, whatever the inputs' strides
    return (kept.keys.clone(memory_format=fresh), kept.values.clone(memory_format=fresh),
            kept.positions.to(INDEX_DTYPE).clone(memory_format=fresh))


@lookahead_stage2.register_fake
def _(keys, values, recent_queries, prompt_mask, pseudo_valid, spec):
    batch, kv_heads, n, _ = keys.shape
    kept = torch.sym_min(CompressionConfig.from_spec(spec).kept_length(n), n)
    return (keys.new_empty(batch, kv_heads, kept, keys.shape[-1]),
            values.new_empty(batch, kv_heads, kept, values.shape[-1]),
            keys.new_empty(batch, kv_heads, kept, dtype=INDEX_DTYPE))


@torch.library.custom_op("kvc::push_query", mutates_args=())
def push_query(buffer: Tensor, key_states: Tensor) -> Tensor:
    """A decode step's buffer of recent queries, unchanged (the pass rewires it to ``shift_in``)."""
    return buffer.clone()


@push_query.register_fake
def _(buffer, key_states):
    return torch.empty_like(buffer)


@torch.library.custom_op("kvc::last_queries", mutates_args=())
def last_queries(query: Tensor, count: int) -> Tensor:
    """The last ``count`` queries [batch, q_heads, count, d]; zeros stand in front for a shorter prompt."""
    # Contiguous, as ``shift_in`` returns it: decode graphs are guarded on the buffer's strides.
    return last_queries_aten(query, count).clone(memory_format=torch.contiguous_format)


def last_queries_aten(query: Tensor, count: int) -> Tensor:
    """``kvc::last_queries`` in aten ops, branch-free for symbolic lengths (ONNX export decomposes
    the op into it)."""
    padded = F.pad(query, (0, 0, torch.sym_max(count - query.shape[2], 0), 0))
    return padded[:, :, padded.shape[2] - count:]


@last_queries.register_fake
def _(query, count):
    return query.new_empty(query.shape[0], query.shape[1], count, query.shape[-1])


@torch.library.custom_op("kvc::shift_in", mutates_args=())
def shift_in(buffer: Tensor, query: Tensor) -> Tensor:
    """The buffer [batch, q_heads, W, d] with ``query``'s tokens appended and as many oldest dropped."""
    return shift_in_aten(buffer, query).clone(memory_format=torch.contiguous_format)


def shift_in_aten(buffer: Tensor, query: Tensor) -> Tensor:
    """``kvc::shift_in`` in aten ops (ONNX export decomposes the op into it)."""
    shifted = torch.cat([buffer, query.to(buffer.dtype)], dim=2)
    return shifted[:, :, shifted.shape[2] - buffer.shape[2]:]


@shift_in.register_fake
def _(buffer, query):
    return buffer.new_empty(buffer.shape)  # contiguous, as the real kernel returns it


@torch.library.custom_op("kvc::append_positions", mutates_args=())
def append_positions(positions: Tensor, key_states: Tensor, start: int) -> Tensor:
    """``positions`` followed by the logical positions ``start, start + 1, ...`` of the new tokens.

    Dense layers ([batch, kv_heads, k]) give each head the new tokens; packed layers ([batch, 1, T])
    append one entry per KV head per token, token-major, as the keys are appended.
    """
    batch, kv_heads, q_len, _ = key_states.shape
    new = torch.arange(start, start + q_len, device=positions.device, dtype=positions.dtype)
    if positions.shape[1] == kv_heads:
        new = new.expand(batch, kv_heads, q_len)
    else:
        new = new.repeat_interleave(kv_heads).expand(batch, 1, q_len * kv_heads)
    return torch.cat([positions, new], dim=-1)


@append_positions.register_fake
def _(positions, key_states, start):
    batch, kv_heads, q_len, _ = key_states.shape
    added = q_len if positions.shape[1] == kv_heads else q_len * kv_heads
    return positions.new_empty(*positions.shape[:-1], positions.shape[-1] + added)


@torch.library.custom_op("kvc::append_positions_at", mutates_args=())
def append_positions_at(positions: Tensor, key_states: Tensor, start: Tensor) -> Tensor:
    """``append_positions`` for dense layers with the first new position given as a tensor ([1]):
    an engine's decode program takes it as an input, where the compiled path bakes in an int."""
    return append_positions_at_aten(positions, key_states, start)


def append_positions_at_aten(positions: Tensor, key_states: Tensor, start: Tensor) -> Tensor:
    """``kvc::append_positions_at`` in aten ops (ONNX export decomposes the op into it)."""
    batch, kv_heads, q_len, _ = key_states.shape
    new = torch.arange(q_len, device=positions.device, dtype=positions.dtype) + start.to(positions.dtype)
    return torch.cat([positions, new.expand(batch, kv_heads, q_len)], dim=-1)


@append_positions_at.register_fake
def _(positions, key_states, start):
    return positions.new_empty(*positions.shape[:-1], positions.shape[-1] + key_states.shape[2])


def decode_score_inputs(
    config: CompressionConfig,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    positions: Tensor,
    layer_idx: int,
    n_layers: int,
    rotary: tuple[Tensor, Tensor, Tensor] | None,
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
    method = config.method_impl
    cos = sin = key_tables = None
    if method.needs_rotary:
        if rotary is None:
            raise ValueError(f"{config.method} un-rotates queries or keys while decoding and needs the rotary "
                             f"tables of the newest tokens and the inverse frequencies")
        step_cos, step_sin, inv_freq = rotary
        rows_per_table = keys.shape[0] // step_cos.shape[0]
        step_cos, step_sin = (table.repeat_interleave(rows_per_table, 0) for table in (step_cos, step_sin))
        cos, sin = rotary_tables_before(step_cos, step_sin, inv_freq, m)
        if method.unrotates_keys:
            # The newest entry holds the step's token: each entry is that many positions before it.
            key_tables = rotary_tables_back(step_cos, step_sin, inv_freq, positions[..., -1:] - positions)
    return ScoreInputs(queries, keys, values, valid, layer_idx, n_layers, cos, sin, query_valid=query_valid,
                       positions=positions, key_tables=key_tables, **score_kernels(keys))


def compress_decode_site(
    config: CompressionConfig,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    attn_mask: Tensor | None,
    layer_idx: int,
    n_layers: int,
    rotary: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bring a dense layer of ``m`` entries back to ``config.decode_target`` per KV head, scored as
    ``decode_score_inputs`` says. Returns kept keys, values and positions, in cache order."""
    batch, _, m, _ = keys.shape
    valid = valid_keys_from_mask(attn_mask, batch, m, keys.device)
    inputs = decode_score_inputs(config, buffer, keys, values, valid, positions, layer_idx, n_layers, rotary)
    method = config.method_impl
    kept = method.select(method.score(inputs), valid, config.decode_target)
    return gather_kept(keys, kept), gather_kept(values, kept), positions.gather(2, kept).to(INDEX_DTYPE)


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


def compress_decode_packed_site(
    config: CompressionConfig,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    heads: Tensor,
    positions: Tensor,
    kv_heads: int,
    layer_idx: int,
    n_layers: int,
    rotary: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bring a packed layer (``keys`` [batch, 1, T, d], ``heads``/``positions`` [batch, 1, T]) back to
    ``kv_heads * config.layer_decode_target(layer_idx, n_layers)`` entries per row, shared between heads as the
    method's selection shares them at prefill (AdaKV: by score, with a per-head floor).

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
    inputs = decode_score_inputs(config, grouped, per_head(keys), per_head(values), valid.reshape(-1, total),
                                 per_head(positions), layer_idx, n_layers, rotary)
    method = config.method_impl
    scores = method.score(inputs).reshape(batch, kv_heads, total).float().masked_fill(~valid, EXCLUDED)
    target = config.layer_decode_target(layer_idx, n_layers)
    # Validity is per head here, already in the scores; ``select`` masks per row.
    flat = method.select(scores, torch.ones_like(valid[:, 0]), target)  # head * T + slot, ascending

    def gather(x: Tensor) -> Tensor:  # [batch * kv_heads, 1, T, *] -> the kept [batch, 1, kept, *]
        rows = x.reshape(batch, kv_heads * total, *x.shape[3:])
        index = flat.view(*flat.shape, *[1] * (x.dim() - 3)).expand(*flat.shape, *x.shape[3:])
        return rows.gather(1, index).unsqueeze(1)

    kept_heads = (flat // total).masked_fill(~valid.reshape(batch, -1).gather(1, flat), -1)
    return (gather(inputs.keys), gather(inputs.values), kept_heads.to(heads.dtype).unsqueeze(1),
            gather(inputs.positions).to(INDEX_DTYPE))


def _decoded_layer(keys: Tensor, values: Tensor, positions: Tensor, spec: str) -> tuple[Tensor, Tensor, Tensor]:
    """Empty tensors of a layer compressed back to its decode-time target (the ops' fake)."""
    batch, kv_heads, _, _ = keys.shape
    target = CompressionConfig.from_spec(spec).decode_target
    return (
        keys.new_empty(batch, kv_heads, target, keys.shape[-1]),
        values.new_empty(batch, kv_heads, target, values.shape[-1]),
        positions.new_empty(batch, kv_heads, target),
    )


@torch.library.custom_op("kvc::compress_decode", mutates_args=())
def compress_decode(
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    attn_mask: Tensor | None,
    layer_idx: int,
    n_layers: int,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode-time eviction of one layer (see ``compress_decode_site``)."""
    config = CompressionConfig.from_spec(spec)
    return compress_decode_site(config, buffer, keys, values, positions, attn_mask, layer_idx, n_layers)


@compress_decode.register_fake
def _(buffer, keys, values, positions, attn_mask, layer_idx, n_layers, spec):
    return _decoded_layer(keys, values, positions, spec)


@torch.library.custom_op("kvc::compress_decode_rotary", mutates_args=())
def compress_decode_rotary(
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    attn_mask: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    inv_freq: Tensor,
    layer_idx: int,
    n_layers: int,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``compress_decode`` for scorers of pre-RoPE queries: ``cos``/``sin`` are the rotary tables of
    the step's tokens and ``inv_freq`` the model's rotary frequencies (see ``compress_decode_site``)."""
    config = CompressionConfig.from_spec(spec)
    return compress_decode_site(config, buffer, keys, values, positions, attn_mask, layer_idx, n_layers,
                                rotary=(cos, sin, inv_freq))


@compress_decode_rotary.register_fake
def _(buffer, keys, values, positions, attn_mask, cos, sin, inv_freq, layer_idx, n_layers, spec):
    return _decoded_layer(keys, values, positions, spec)


@torch.library.custom_op("kvc::compress_decode_packed", mutates_args=())
def compress_decode_packed(
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    heads: Tensor,
    positions: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    inv_freq: Tensor | None,
    kv_heads: int,
    layer_idx: int,
    n_layers: int,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode-time eviction of one packed layer (see ``compress_decode_packed_site``); ``cos``, ``sin``
    and ``inv_freq`` as for ``compress_decode_rotary``, for scorers of pre-RoPE queries (else None)."""
    config = CompressionConfig.from_spec(spec)
    rotary = None if cos is None else (cos, sin, inv_freq)
    return compress_decode_packed_site(config, buffer, keys, values, heads, positions, kv_heads, layer_idx, n_layers,
                                       rotary)


@compress_decode_packed.register_fake
def _(buffer, keys, values, heads, positions, cos, sin, inv_freq, kv_heads, layer_idx, n_layers, spec):
    batch = keys.shape[0]
    kept = kv_heads * CompressionConfig.from_spec(spec).layer_decode_target(layer_idx, n_layers)
    return (keys.new_empty(batch, 1, kept, keys.shape[-1]), values.new_empty(batch, 1, kept, values.shape[-1]),
            heads.new_empty(batch, 1, kept), positions.new_empty(batch, 1, kept))
