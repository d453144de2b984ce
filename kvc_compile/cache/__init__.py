"""Compressed KV caches compatible with transformers' ``Cache``.

After compression a layer holds ``k < n`` tokens but has seen ``n``: the next token's RoPE
position is ``n`` (logical), while attention spans ``k + 1`` keys (physical). ``CompressedCache``
tracks both. Masks use the physical length with the offset ``n - k``, so the 2-D attention mask
(logical, as ``generate`` keeps it) lines up with the kept tokens: kept indices are stored in
ascending order, so with left padding any padding slot a short row had to keep comes first, at
a logical position the mask marks as padding.

Layers also record which entries they hold (``positions``: the logical position of each, prompt
entries first, then decoded ones; ``heads``), and, when the pass
projects entries to low rank (KQ-SVD), the factors they were projected with: decoding projects
each new key and value the same way and hands attention the factors that project queries and
lift outputs back (``CachedKeys``). Methods whose heads
or layers keep different counts store the *packed* layout (``kvc_compile.methods.base``): one
flat run of entries per row, labelled by KV head, read at decode time by the ``"kvc"`` attention
implementation (``kvc_compile.cache.attention``). Decoding appends one entry per KV head.

Decoding writes in place. A layer's keys, values, positions and head labels live in storage with
room for more entries (``GROWTH_STEP`` at a time, never per token): a decode step writes its new
entries after the live ones and the layer hands attention a view of the live prefix, so a step reads
the cache once and copies none of it. Assigning a tensor to ``layer.keys`` (compression, reordering,
cropping) makes it the layer's storage as it is; the next step moves it into room to grow. Layers
whose entries change while decoding (decode-time eviction, LAQ's rollout) and sliding-window layers
append by concatenation instead.

A plain ``DynamicCache`` also works for unpadded batches under ``generate()`` with the dense
layout, which passes logical positions itself; use ``CompressedCache`` for padded batches, for
packed layouts and for direct forward calls without positions.

Sliding-window layers (``config.sliding_window``, ``layer_types``) are bounded already: built with
``CompressedCache(config=model.config)``, such a layer keeps only the last ``window - 1`` entries,
as transformers' ``DynamicSlidingWindowLayer`` does, and the kvc pass leaves it uncompressed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvc_compile.compression.layout import INDEX_DTYPE
from kvc_compile.ops import prefill_entries
from kvc_compile.ops.decode import append_positions, prompt_kv, push_query, recent_queries, refuse_stage1_decoding
from kvc_compile.ops.lowrank import lowrank_factors, lowrank_project


class CachedKeys(NamedTuple):
    """What a packed or low-rank layer hands to attention instead of a dense key tensor."""

    keys: Tensor  # [batch, kv_heads, T, d] (dense) or [batch, 1, T, d] (packed); d = R when low-rank
    heads: Tensor | None = None  # packed: [batch, 1, T], KV head of each entry (-1: padding, attended by nobody)
    key_up: Tensor | None = None  # low-rank: [kv_heads, head_dim, R], queries are projected by it
    value_up: Tensor | None = None  # low-rank: [kv_heads, head_dim, R_v], lifts outputs back to head_dim
    output_fold: Tensor | None = None  # low-rank: o_proj's weight with value_up folded in (or empty)

    def __getattr__(self, name: str):
        # Reached when a dense attention implementation treats this as a tensor (``.shape``, ...).
        if name.startswith("__"):
            raise AttributeError(name)
        raise TypeError(
            f"this layer's KV cache is packed per head or stored at low rank, which dense attention cannot "
            f"read (it asked for .{name}). Load the model with attn_implementation='kvc' (after "
            f"`import kvc_compile`), or call model.set_attn_implementation('kvc')."
        )


SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def sliding_windows(config: PretrainedConfig) -> dict[int, int]:
    """{layer index: window} for every layer of ``config`` whose attention slides over a window."""
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    if window is None:
        return {}
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return {index: window for index, kind in enumerate(layer_types) if kind in SLIDING_LAYER_TYPES}


# Free entries a layer's storage gains when a step outgrows it; capacity stays a multiple of it.
GROWTH_STEP = 256


def grown_capacity(needed: int) -> int:
    """Capacity for ``needed`` entries: at least ``GROWTH_STEP`` free after them, a multiple of it."""
    return (needed // GROWTH_STEP + 2) * GROWTH_STEP


def token_major(states: Tensor) -> Tensor:
    """A step's [batch, kv_heads, q, d] entries as the packed run appends them: [batch, 1, q * kv_heads, d],
    token-major and head-minor (the newest token's entries are the last kv_heads of the run)."""
    batch, kv_heads, q_len, _ = states.shape
    return states.transpose(1, 2).reshape(batch, 1, q_len * kv_heads, -1)


def new_head_labels(key_states: Tensor) -> Tensor:
    """The KV head of each entry ``token_major(key_states)`` appends: [batch, 1, q * kv_heads]."""
    batch, kv_heads, q_len, _ = key_states.shape
    labels = torch.arange(kv_heads, device=key_states.device, dtype=INDEX_DTYPE).repeat(q_len)
    return labels.expand(batch, 1, -1)


def _live_prefix(name: str) -> property:
    """A tensor attribute of ``CompressedLayer`` backed by storage that may hold room beyond its length.

    Reading gives the live prefix (entries are along dim 2 of keys, values, positions and heads);
    assigning a tensor makes it the whole storage, with no room (``_append_in_place`` grows it)."""

    def read(layer: CompressedLayer) -> Tensor | None:
        store, length = layer._stores.get(name), layer._lengths.get(name)
        return store if length is None else store[:, :, :length]

    def assign(layer: CompressedLayer, value: Tensor | None) -> None:
        layer._stores[name] = value
        layer._lengths[name] = None

    return property(read, assign, doc=f"the layer's live {name} (a view of its storage while decoding)")


class CompressedLayer(DynamicLayer):
    """A ``DynamicLayer`` that also counts the tokens it has seen (its logical length) and appends in place.

    ``sliding_window``: the layer's attention reads only the last ``sliding_window`` positions, so it
    keeps at most ``sliding_window - 1`` entries after each step (never compressed by the pass)."""

    keys = _live_prefix("keys")
    values = _live_prefix("values")
    positions = _live_prefix("positions")
    heads = _live_prefix("heads")

    def __init__(self, sliding_window: int | None = None) -> None:
        # Storage and live length of each tensor attribute (length None: the whole storage is live).
        self._stores: dict[str, Tensor | None] = {}
        self._lengths: dict[str, int | None] = {}
        super().__init__()
        self.positions = self.heads = None
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.logical_length = 0
        self.kv_heads = key_states.shape[1]
        self.positions = self.heads = None
        # Low-rank factors [kv_heads, head_dim, R] (rank 0: full-rank entries).
        self.key_down = self.key_up = self.value_down = self.value_up = self.output_fold = None
        # Post-RoPE queries of the newest tokens [batch, q_heads, W, d], for decode-time scoring
        # (W = 0: none kept).
        self.recent_queries = key_states.new_empty(key_states.shape[0], 0, 0, key_states.shape[-1])
        # The full prompt entries, kept until LAQ's second stage re-scores them (None: not kept).
        self.prompt_keys: Tensor | None = None
        self.prompt_values: Tensor | None = None
        self.rolling_out = False  # True while LAQ decodes its pseudo tokens

    @property
    def packed(self) -> bool:
        """True when the layer stores the packed per-head layout (one flat run of labelled entries)."""
        return self.is_initialized and self.keys.shape[1] != self.kv_heads

    @property
    def lowrank(self) -> bool:
        """True when entries are stored projected to rank R (KQ-SVD), not at head_dim."""
        return self.key_down is not None and self.key_down.shape[-1] > 0

    @property
    def appends_in_place(self) -> bool:
        """Whether decode steps write into the layer's storage: not while entries change as it decodes
        (a buffer of recent queries, LAQ's prompt entries) nor for a sliding window."""
        return (self.is_initialized and self.sliding_window is None and self.recent_queries.shape[2] == 0
                and (self.prompt_keys is None or self.prompt_keys.shape[2] == 0) and not self.rolling_out)

    def storage_capacity(self) -> int:
        """Entries the keys' storage can hold (per KV head; packed: per row) before it must grow."""
        store = self._stores.get("keys")
        return 0 if store is None or store.dim() < 3 else store.shape[2]

    def _append_in_place(self, name: str, new: Tensor) -> None:
        """Write ``new`` after the live entries of ``name`` along dim 2, growing its storage by steps."""
        store, length = self._stores[name], self._lengths[name]
        start = store.shape[2] if length is None else length
        end = start + new.shape[2]
        if store.shape[2] < end:
            grown = store.new_empty(*store.shape[:2], grown_capacity(end), *store.shape[3:])
            grown[:, :, :start].copy_(store[:, :, :start])
            self._stores[name] = store = grown
        store[:, :, start:end].copy_(new)
        self._lengths[name] = end

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if self.appends_in_place:
            return self._update_in_place(key_states, value_states)
        first = not self.is_initialized
        if not first:
            self._record_decoded(key_states)
            if self.lowrank:
                key_states = lowrank_project(key_states, None, self.key_down)
                value_states = lowrank_project(value_states, None, self.value_down)
        if self.packed:
            return self._append_packed(key_states, value_states)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if first:
            # What the prompt cached, unprojected; the kvc pass rewires these to what compression
            # kept, to the calibrated low-rank factors and, for decode-time compression, to the
            # prompt's last queries.
            self.positions, self.heads = prefill_entries(key_states)
            factors = lowrank_factors(key_states)
            self.key_down, self.key_up, self.value_down, self.value_up, self.output_fold = factors
            self.recent_queries = recent_queries(key_states)
            self.prompt_keys, self.prompt_values = prompt_kv(key_states, value_states)
        self.logical_length += key_states.shape[-2]
        if self.sliding_window is not None:
            self._keep_window(copy=first)  # attention still reads this step's full keys and values
        if not first and self.lowrank:
            return CachedKeys(keys, None, self.key_up, self.value_up, self.output_fold), values
        return keys, values

    def _update_in_place(self, key_states: Tensor, value_states: Tensor):
        batch, kv_heads, q_len, _ = key_states.shape
        start = self.logical_length
        if self.lowrank:
            key_states = lowrank_project(key_states, None, self.key_down)
            value_states = lowrank_project(value_states, None, self.value_down)
        new_positions = torch.arange(start, start + q_len, device=key_states.device, dtype=INDEX_DTYPE)
        if self.packed:
            self._append_in_place("heads", new_head_labels(key_states))
            key_states, value_states = token_major(key_states), token_major(value_states)
            new_positions = new_positions.repeat_interleave(kv_heads).expand(batch, 1, q_len * kv_heads)
        else:
            new_positions = new_positions.expand(batch, kv_heads, q_len)
        self._append_in_place("keys", key_states)
        self._append_in_place("values", value_states)
        if self.positions is not None:
            self._append_in_place("positions", new_positions)
        self.logical_length += q_len
        if self.packed or self.lowrank:
            factors = (self.key_up, self.value_up, self.output_fold) if self.lowrank else ()
            return CachedKeys(self.keys, self.heads if self.packed else None, *factors), self.values
        return self.keys, self.values

    def _keep_window(self, copy: bool) -> None:
        """Keep the last ``sliding_window - 1`` entries: all the next token's attention reads. ``copy``
        (the prompt) frees the rest of the prompt's storage, which a view would keep alive."""
        keep = self.sliding_window - 1
        kept = [self.keys[:, :, -keep:], self.values[:, :, -keep:]]
        kept += [self.positions[..., -keep:], self.heads[..., -keep:]]
        if copy:
            kept = [tensor.clone() for tensor in kept]
        self.keys, self.values, self.positions, self.heads = kept

    def _record_decoded(self, key_states: Tensor) -> None:
        """Positions of the entries about to be appended and, if kept, the buffer of recent queries."""
        if self.prompt_keys is not None and self.prompt_keys.shape[2] > 0 and not self.rolling_out:
            # An op that fails when run, not a Python raise: inside a compiled step a raise would
            # split the graph instead of reaching the user.
            self.positions = refuse_stage1_decoding(self.positions)
        self.positions = append_positions(self.positions, key_states, self.logical_length)
        if self.recent_queries.shape[2] > 0:
            self.recent_queries = push_query(self.recent_queries, key_states)

    def _append_packed(self, key_states: Tensor, value_states: Tensor):
        self.keys = torch.cat([self.keys, token_major(key_states)], dim=-2)
        self.values = torch.cat([self.values, token_major(value_states)], dim=-2)
        self.heads = torch.cat([self.heads, new_head_labels(key_states)], dim=-1)
        self.logical_length += key_states.shape[2]
        if self.lowrank:
            return CachedKeys(self.keys, self.heads, self.key_up, self.value_up, self.output_fold), self.values
        return CachedKeys(self.keys, self.heads), self.values

    @property
    def physical_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    @property
    def entries_per_head(self) -> int:
        """Entries held per KV head (packed: on average over the heads, padding slots included)."""
        return self.physical_length // self.kv_heads if self.packed else self.physical_length

    def get_seq_length(self) -> int:
        return self.logical_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized:
            return query_length, 0
        if self.packed:
            # The "kvc" attention masks packed entries by their head labels; the mask only needs
            # a consistent (logical) size.
            return self.logical_length + query_length, 0
        return self.physical_length + query_length, self.logical_length - self.physical_length

    def crop(self, tokens_to_remove: int) -> None:
        if self.packed:
            raise NotImplementedError("cropping a packed (per-head budget) cache is not supported")
        before = self.physical_length
        super().crop(tokens_to_remove)
        self.logical_length -= before - self.physical_length
        if self.positions is not None:
            self.positions = self.positions[..., : self.physical_length]

    def set_compressed(
        self, compressed, logical_length: int, kv_heads: int, factors=None, recent_queries: Tensor | None = None
    ) -> None:
        """Replace the stored tokens by a compressed set (a ``CompressedKV``) standing for ``logical_length``.

        ``factors``: (key_down, key_up, value_down, value_up[, output_fold]) when the entries are
        stored at low rank; ``recent_queries``: the buffer decode-time compression scores with.
        """
        if not self.is_initialized:
            self.lazy_initialization(compressed.keys, compressed.values)
        self.kv_heads = kv_heads
        self.keys, self.values = compressed.keys, compressed.values
        self.positions, self.heads = compressed.positions, compressed.heads
        if factors is not None:
            self.key_down, self.key_up, self.value_down, self.value_up = factors[:4]
            self.output_fold = factors[4] if len(factors) > 4 else None
        if recent_queries is not None:
            self.recent_queries = recent_queries
        self.logical_length = logical_length


class CompressedCache(DynamicCache):
    """A dynamic cache whose layers keep logical and physical lengths apart.

    ``config``: the model's config, whose sliding-window layers then keep only their window (as
    ``DynamicCache(config=...)`` does); needed for models with such layers (Mistral with
    ``sliding_window``, Qwen2 with ``use_sliding_window``), which the kvc pass otherwise refuses.
    """

    def __init__(self, config: PretrainedConfig | None = None) -> None:
        windows = {} if config is None else sliding_windows(config)
        if not windows:
            Cache.__init__(self, layer_class_to_replicate=CompressedLayer)
            return
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        Cache.__init__(self, layers=[CompressedLayer(sliding_window=windows.get(index)) for index in range(n_layers)])

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length for layer in self.layers]


def _storage_bytes(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.untyped_storage().nbytes()


def cache_nbytes(cache: Cache) -> int:
    """Bytes of storage the cache's tensors hold: keys and values, plus entry positions and heads
    where the layer records them. Measured from the tensors' storages, not from the budget."""
    total = 0
    for layer in cache.layers:
        total += _storage_bytes(layer.keys) + _storage_bytes(layer.values)
        total += _storage_bytes(getattr(layer, "positions", None)) + _storage_bytes(getattr(layer, "heads", None))
    return total


def kept_tokens_per_layer(cache: Cache) -> list[int]:
    """Entries each layer physically stores: per KV head (dense layout) or per row (packed layout)."""
    return [layer.keys.shape[-2] if layer.keys is not None else 0 for layer in cache.layers]


__all__ = [
    "CachedKeys",
    "CompressedCache",
    "CompressedLayer",
    "cache_nbytes",
    "kept_tokens_per_layer",
    "sliding_windows",
]
