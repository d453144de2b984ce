"""The programs an engine is made of, as modules ``torch.export`` can trace.

``PrefillProgram``: ``(input_ids, attention_mask) -> (logits of the last token, *cache state)``.
The model runs on a fresh ``CompressedCache``; the kvc pass, applied to the exported aten graph,
inserts compression after each attention and rewires the returned cache tensors to what it kept.

``DecodeProgram``: one token for every row of the batch over a cache of fixed capacity.
``(input_ids [b, 1], position_ids [b, 1], attention_mask [b, 1, 1, live], slot [1], *state)
-> logits [b, vocab]``; the state buffers are written in place (the new token's entries go to token
slot ``slot`` of the layer with the most prompt slots, and ``prompt_slots`` fewer in each other
layer), so every step gets the same buffers. Attention reads only the live prefix of each buffer:
the mask's length ``live`` is the entries the largest layer holds once this step's are written,
``(slot + 1) * entries per token``, a dynamic dimension of the program, and each layer reads that
less its difference in prompt slots. The mask says which of those slots hold real entries; the
runtime builds it the way the compiled path slices its 2-D mask (``kvc_compile.engine.runtime``).

Per layer the state is ``keys, values`` plus ``heads`` (packed layout: the KV head of each entry,
-1 for an empty slot) plus the five low-rank factors (KQ-SVD), in ``state_names`` order.

Compression while decoding (MorphKV, ``decoding_interval``) uses the *rolling* layout instead: a
fixed-capacity cache whose step drops the oldest slot. Per layer ``keys, values, positions,
recent_queries`` (``RollingState``), the entries ending at the last slot (empty slots first, masked
like padding). A step drops the first slot and appends the new entry, and
returns the new state after the logits (``step`` is then the new token's logical position). Two
programs share these shapes: one that only appends, and one in which the kvc pass evicts back to
``target_size`` after attention (``CompressDecodeCache``). The capacity is ``target_size +
decoding_interval``, so the evicting step scores exactly the entries the compiled path scores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from kvc_compile.cache import CachedKeys, CompressedCache
from kvc_compile.compression.layout import INDEX_DTYPE
from kvc_compile.compression.lowrank import FACTOR_NAMES
from kvc_compile.config import CompressionConfig
from kvc_compile.engine.state import (
    LOWRANK_NAMES,
    LookaheadState,
    RollingState,
    SlotState,
    Stage2Input,
    flatten,
    prefill_names,
    unflatten,
)
from kvc_compile.lookahead import prompt_position_ids
from kvc_compile.ops.decode import append_positions_at, lookahead_stage2, push_query
from kvc_compile.ops.lowrank import lowrank_project
from kvc_compile.transformers_compat import with_cache

assert LOWRANK_NAMES[:len(FACTOR_NAMES)] == FACTOR_NAMES  # the prefill returns the factors in the op's order


@dataclass(frozen=True)
class StateLayout:
    """Which tensors describe one layer's cache, and how long they are."""

    packed: bool
    lowrank: bool
    rolling: bool = False  # the rolling layout: compression while decoding (see the module docstring)
    lookahead: bool = False  # LAQ: the prefill also returns the full prompt and the query buffer

    @classmethod
    def of(cls, config: CompressionConfig) -> StateLayout:
        method = config.method_impl
        return cls(packed=method is not None and method.layout == "packed", lowrank=config.lowrank is not None,
                   rolling=config.decode_target is not None,
                   lookahead=method is not None and method.lookahead_queries > 0 and config.decode_target is None)

    @property
    def state_names(self) -> tuple[str, ...]:
        if self.rolling:
            return RollingState._fields
        names = ("keys", "values")
        if self.packed:
            names += ("heads",)
        if self.lowrank:
            names += LOWRANK_NAMES
        return names

    @property
    def record(self) -> type[SlotState] | type[RollingState]:
        """The record of one layer's decode state."""
        return RollingState if self.rolling else SlotState

    @property
    def prefill_record(self) -> type[SlotState] | type[RollingState] | type[LookaheadState]:
        """The record of what the prefill program returns per layer."""
        return LookaheadState if self.lookahead else self.record

    @property
    def constant_names(self) -> tuple[str, ...]:
        """The state tensors that are the same for every prompt and step (KQ-SVD factors): no batch axis."""
        return LOWRANK_NAMES if self.lowrank and not self.rolling else ()

    @property
    def entry_names(self) -> tuple[str, ...]:
        """The state tensors whose length grows with the entries (the others are per-layer constants)."""
        if self.rolling:
            return ("keys", "values", "positions")
        return ("keys", "values", "heads") if self.packed else ("keys", "values")

    @property
    def prefill_names(self) -> tuple[str, ...]:
        """What the prefill program returns per layer: the state, and the kept entries' positions."""
        if self.lookahead:
            return LookaheadState._fields
        return prefill_names(self.state_names)


class PrefillProgram(nn.Module):
    """The prompt through the model; returns the last token's logits, then per layer the cache
    state (``StateLayout.state_names``) and the kept entries' positions."""

    def __init__(self, model: nn.Module, layout: StateLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        cache = CompressedCache()
        out = self.model(input_ids, attention_mask=attention_mask,
                         position_ids=prompt_position_ids(input_ids, attention_mask), **with_cache(cache),
                         use_cache=True, logits_to_keep=1)
        names = self.layout.prefill_names
        layers = [self.layout.prefill_record(**{name: _layer_state(layer, name) for name in names})
                  for layer in cache.layers]
        return (out.logits[:, -1], *flatten(layers, names))


def _layer_state(layer, name: str) -> Tensor:
    value = getattr(layer, name)
    if name == "output_fold" and value is None:
        return layer.keys.new_empty(0, 0)
    return value


class FixedCapacityLayer(DynamicLayer):
    """A cache layer over buffers of fixed capacity: attention and masks always span all of it."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[-2], 0


class SlotLayer(FixedCapacityLayer):
    """A cache layer over fixed-capacity buffers: decoding writes the new entries to a slot."""

    def __init__(self, layout: StateLayout, state: SlotState, slot: Tensor, live: int, kv_heads: int) -> None:
        super().__init__(state.keys, state.values)
        self.layout = layout
        self.state = state
        self.slot = slot
        self.live = live  # the entries attention reads: the buffers' prefix up to this step's
        self.kv_heads = kv_heads

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        state = self.state
        if self.layout.lowrank:
            key_states = lowrank_project(key_states, None, state.key_down)
            value_states = lowrank_project(value_states, None, state.value_down)
        if self.layout.packed:
            # Token-major, head-minor like the compiled packed layout: the token's kv_heads entries.
            batch = key_states.shape[0]
            index = self.slot * self.kv_heads + torch.arange(self.kv_heads, device=self.slot.device)
            self.keys.index_copy_(2, index, key_states.transpose(1, 2).reshape(batch, 1, self.kv_heads, -1))
            self.values.index_copy_(2, index, value_states.transpose(1, 2).reshape(batch, 1, self.kv_heads, -1))
            heads = torch.arange(self.kv_heads, device=index.device, dtype=INDEX_DTYPE)
            state.heads.index_copy_(2, index, heads.expand(batch, 1, -1).contiguous())
        else:
            self.keys.index_copy_(2, self.slot, key_states)
            self.values.index_copy_(2, self.slot, value_states)
        # Only the live prefix: the slots after this step's hold nothing yet.
        keys, values = self.keys[:, :, : self.live], self.values[:, :, : self.live]
        if self.layout.packed or self.layout.lowrank:
            factors = {}
            if self.layout.lowrank:
                factors = dict(key_up=state.key_up, value_up=state.value_up,
                               output_fold=state.output_fold if state.output_fold.numel() else None)
            heads = state.heads[:, :, : self.live] if self.layout.packed else None
            return CachedKeys(keys, heads, **factors), values
        return keys, values


class RollingLayer(FixedCapacityLayer):
    """A rolling-layout cache layer (see the module docstring): a step drops the first slot, empty
    whenever the runtime calls it, and appends the new entry. It calls the markers
    ``CompressedLayer`` calls while decoding, so the kvc pass shifts the query buffer and can evict
    as in the compiled path."""

    def __init__(self, state: RollingState, position: Tensor) -> None:
        super().__init__(state.keys, state.values)
        self.state = state
        self.position = position

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        positions = append_positions_at(self.state.positions[..., 1:], key_states, self.position)
        recent_queries = push_query(self.state.recent_queries, key_states)
        self.keys = torch.cat([self.keys[:, :, 1:], key_states], dim=-2)
        self.values = torch.cat([self.values[:, :, 1:], value_states], dim=-2)
        self.state = RollingState(self.keys, self.values, positions, recent_queries)
        return self.keys, self.values


class SlotCache(Cache):
    def __init__(self, layers: list[FixedCapacityLayer]) -> None:
        super().__init__(layers=layers)


class DecodeProgram(nn.Module):
    """One decoding step over fixed-capacity buffers (see the module docstring)."""

    def __init__(self, model: nn.Module, layout: StateLayout, prompt_slots: list[int],
                 return_state: bool = False) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        # ONNX has no in-place update of inputs: its decode graph returns the written buffers too,
        # as rolling-layout programs always do (their buffers change shape inside the step).
        self.return_state = return_state or layout.rolling
        # Per layer, the slots reserved for prompt entries (per KV head; packed: per row, a multiple
        # of kv_heads).
        self.prompt_slots = list(prompt_slots)
        self.kv_heads = model.config.num_key_value_heads

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, slot: Tensor,
                *state: Tensor) -> Tensor:
        """``slot``: the rolling layout's new logical position instead (its buffers always end at the newest entry)."""
        names = self.layout.state_names
        layer_states = unflatten(self.layout.record, names, state)
        if self.layout.rolling:
            layers = [RollingLayer(layer_state, slot) for layer_state in layer_states]
        else:
            entries_per_token = self.kv_heads if self.layout.packed else 1
            live, most = attention_mask.shape[-1], max(self.prompt_slots)
            layers = [SlotLayer(self.layout, layer_state, slot - (most - prompt_slots) // entries_per_token,
                                live - (most - prompt_slots), self.kv_heads)
                      for layer_state, prompt_slots in zip(layer_states, self.prompt_slots, strict=True)]
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **with_cache(SlotCache(layers)), use_cache=True)
        if self.return_state:  # the buffers a step changes (not the per-layer constants)
            changed = [name for name in names if name not in self.layout.constant_names]
            return (out.logits[:, -1], *flatten([layer.state for layer in layers], changed))
        return out.logits[:, -1]


class LookaheadStage2Program(nn.Module):
    """LAQ's second stage: each layer's full prompt re-scored by its buffered queries (``stage2_entries``).

    ``(prompt_mask [b, n], pseudo_valid [b, lookahead], *per layer (prompt_keys, prompt_values,
    recent_queries)) -> per layer (keys, values, positions)`` of the cache decoding starts from."""

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__()
        self.spec = config.to_spec()

    def forward(self, prompt_mask: Tensor, pseudo_valid: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        outputs: list[Tensor] = []
        for layer in unflatten(Stage2Input, Stage2Input._fields, state):
            outputs += lookahead_stage2(layer.prompt_keys, layer.prompt_values, layer.recent_queries, prompt_mask,
                                        pseudo_valid, self.spec)
        return tuple(outputs)


def _placeholder(tensor: Tensor) -> Tensor:
    """A tensor with ``tensor``'s shape, dtype and parameter-ness and no data (the meta device)."""
    empty = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty


@contextmanager
def without_weights(exported: torch.export.ExportedProgram) -> Iterator[None]:
    """``exported`` with every tensor of its state dict and constants replaced by a data-less
    placeholder, for saving: an engine's programs share one copy of the weights in its weights file
    (``SharedWeights``), put back by ``with_weights`` at load. Restored on exit."""
    stores = (exported.state_dict, exported.constants)
    saved = [dict(store) for store in stores]
    try:
        for store in stores:
            store.update({name: _placeholder(value) for name, value in store.items() if isinstance(value, Tensor)})
        yield
    finally:
        for store, original in zip(stores, saved, strict=True):
            store.update(original)


def with_weights(exported: torch.export.ExportedProgram, keys: Mapping[str, str],
                 tensors: Mapping[str, Tensor]) -> nn.Module:
    """The runnable module of an exported program saved ``without_weights``: each state-dict entry
    and tensor constant ``name`` becomes ``tensors[keys[name]]`` (the tensors are shared, not copied)."""
    for store in (exported.state_dict, exported.constants):
        for name, value in store.items():
            if not isinstance(value, Tensor):
                continue
            if name not in keys or keys[name] not in tensors:
                raise KeyError(f"no stored tensor for {name}")
            tensor = tensors[keys[name]]
            if tensor.shape != value.shape or tensor.dtype != value.dtype:
                raise ValueError(f"the stored tensor for {name} is {tensor.dtype} {tuple(tensor.shape)}, and the "
                                 f"program expects {value.dtype} {tuple(value.shape)}")
            store[name] = nn.Parameter(tensor, requires_grad=False) if isinstance(value, nn.Parameter) else tensor
    return exported.module()


__all__ = ["DecodeProgram", "LookaheadStage2Program", "PrefillProgram", "RollingLayer", "SlotCache", "SlotLayer",
           "StateLayout", "with_weights", "without_weights"]
