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
eviction (``kvc_compile.compression.decoding``): the method's scorer over the whole layer, fed the
buffer as the newest queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.compression.decoding import Rotary, evict_dense, evict_packed
from kvc_compile.compression.layout import INDEX_DTYPE
from kvc_compile.compression.lookahead import stage2_entries
from kvc_compile.config import CompressionConfig
from kvc_compile.ops.kernels import device_kernels


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
    """LAQ's stage 2 on one layer as an op (``kvc_compile.compression.lookahead.stage2_entries``): kept
    keys, values and positions. An engine's stage-2 program calls it, so the kept count stays a formula
    of the prompt length instead of a traced constant."""
    config = CompressionConfig.from_spec(spec)
    with device_kernels(keys):
        kept = stage2_entries(config.method_impl, config.kept_length(keys.shape[2]), keys, values, recent_queries,
                              prompt_mask, pseudo_valid)
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


def compress_decode_site(
    config: CompressionConfig,
    buffer: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    attn_mask: Tensor | None,
    layer_idx: int,
    n_layers: int,
    rotary: Rotary | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """What ``kvc::compress_decode`` computes: ``compression.decoding.evict_dense`` to ``config.decode_target``."""
    with device_kernels(keys):
        return evict_dense(config.method_impl, config.decode_target, buffer, keys, values, positions, attn_mask,
                           layer_idx, n_layers, rotary)


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
    rotary: Rotary | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What ``kvc::compress_decode_packed`` computes: ``compression.decoding.evict_packed`` to the layer's
    share of ``config.decode_target``."""
    target = config.layer_decode_target(layer_idx, n_layers)
    with device_kernels(keys):
        return evict_packed(config.method_impl, target, buffer, keys, values, heads, positions, kv_heads, layer_idx,
                            n_layers, rotary)


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
