"""One prefill per sample for every configuration: the leaderboard's fast path on a CPU.

Compression runs after each layer's prefill attention and never changes the prefill's hidden
states, so every configuration of a sample starts from the same prefill. This path runs it once
(``capture_prefill``), compresses the captured layers with each configuration's reference method
(``compress_prefill``, the oracle the compiled path is tested against), and decodes the question
and answer on each compressed cache. Caches that share a layout are stacked into one batch and
decoded together: configurations that keep the same number of entries per head (dense), or any
packed caches (padded with head -1 slots, which no head attends to). Configurations that change the
cache while decoding (MorphKV, periodic compression) or roll out pseudo tokens (LAQ) decode alone,
with each step's queries captured as ``reference_decode`` does.

A grid of 17 methods x 4 ratios then costs one prefill and 17 decodes per sample (the full cache,
and per ratio a dense batch, a packed batch, LAQ and MorphKV) instead of 69 prefills and decodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from kvc_compile.cache import CompressedCache, CompressedLayer
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.compression.layout import CompressedKV
from kvc_compile.config import CompressionConfig
from kvc_compile.lookahead import generate_tokens, lookahead_stage
from kvc_compile.reference import (
    CapturedPrefill,
    RecordingStep,
    attention_implementation,
    capture_prefill,
    capture_prefill_attention,
    compress_prefill,
    prefill_scores,
)
from kvc_compile.transformers_compat import with_cache

FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa_attention_forward at each call
Step = Callable[[Tensor, Tensor], Tensor]  # (ids [batch, q], mask [batch, length]) -> last logits [batch, vocab]


def chunk_step(model: PreTrainedModel, cache: CompressedCache) -> Step:
    """A forward of one or more new tokens on ``cache``, at the logical positions ``mask`` implies
    (as ``generate()`` feeds a question after the prompt)."""

    def step(ids: Tensor, mask: Tensor) -> Tensor:
        position_ids = mask.long().cumsum(-1)[:, -ids.shape[1]:] - 1
        out = model.forward(input_ids=ids, attention_mask=mask, position_ids=position_ids, **with_cache(cache),
                            use_cache=True)
        return out.logits[:, -1]

    return step


def greedy_answers(
    step: Step,
    mask: Tensor,
    appended_ids: Tensor | None,
    first_token: Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> list[Tensor]:
    """Each row's greedy answer [1, t] (cut after its first EOS): ``appended_ids`` is fed first, or,
    when None, ``first_token`` (already predicted by the prefill) is the answer's first token."""
    batch = mask.shape[0]
    if appended_ids is not None:
        mask = torch.cat([mask, mask.new_ones(batch, appended_ids.shape[1])], dim=-1)
        token = step(appended_ids.expand(batch, -1), mask).argmax(dim=-1, keepdim=True)
    else:
        token = first_token.expand(batch, -1)
    # Rows are independent, so decoding stops once every row has ended (as generate() does); what a
    # row decodes after its EOS is cut below.
    eos = torch.tensor([] if eos_token_id is None else [eos_token_id], dtype=torch.long, device=token.device)
    out = generate_tokens(step, token, mask, max_new_tokens, eos=eos)
    answers = []
    for row in out:
        ends = (row == eos_token_id).nonzero() if eos_token_id is not None else row.new_empty(0, 1)
        answers.append(row[: int(ends[0, 0]) + 1 if len(ends) else len(row)].unsqueeze(0))
    return answers


class ReservedLayer(CompressedLayer):
    """A dense layer with room reserved for ``extra`` more tokens per head: decoding writes each new
    entry in place instead of concatenating the whole cache again. On a CPU, re-allocating a batch of
    caches at every step costs more than the step's attention. Same entries, same results."""

    @classmethod
    def reserving(cls, layer: CompressedLayer, extra: int) -> ReservedLayer:
        if layer.packed or layer.lowrank:
            raise ValueError("only dense, full-rank layers reserve room for decoding in place")
        reserved = cls()
        reserved.__dict__.update(layer.__dict__)
        batch, heads, length, _ = layer.keys.shape
        reserved.key_room = torch.cat([layer.keys, layer.keys.new_empty(batch, heads, extra, layer.keys.shape[-1])], 2)
        reserved.value_room = torch.cat(
            [layer.values, layer.values.new_empty(batch, heads, extra, layer.values.shape[-1])], 2
        )
        reserved.keys, reserved.values = reserved.key_room[:, :, :length], reserved.value_room[:, :, :length]
        return reserved

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self._record_decoded(key_states)
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        if end > self.key_room.shape[2]:
            raise RuntimeError(f"the reserved cache holds {self.key_room.shape[2]} entries per head; decoding "
                               f"asked for {end}: reserve more room")
        self.key_room[:, :, start:end] = key_states
        self.value_room[:, :, start:end] = value_states
        self.keys, self.values = self.key_room[:, :, :end], self.value_room[:, :, :end]
        self.logical_length += key_states.shape[2]
        return self.keys, self.values


def _pad_entries(tensor: Tensor, length: int, value: int) -> Tensor:
    """Pad the entry axis (dim 2) of a [batch, heads_axis, T(, d)] tensor to ``length`` at the end."""
    missing = length - tensor.shape[2]
    pad = (0, 0, 0, missing) if tensor.dim() == 4 else (0, missing)
    return F.pad(tensor, pad, value=value)


def stack_caches(caches: Sequence[CompressedCache]) -> CompressedCache:
    """One cache whose rows are ``caches``' single rows. Dense layers must agree in shape; packed
    layers are padded to the longest with head -1 slots (the padding ``pack_entries`` uses)."""
    stacked = CompressedCache()
    for layers in zip(*(cache.layers for cache in caches), strict=True):
        first = layers[0]
        if any(layer.packed != first.packed or layer.lowrank or layer.recent_queries.shape[2] for layer in layers):
            raise ValueError("only dense caches of one shape, or packed caches, without low-rank entries or query "
                             "buffers, stack into one batch")
        length = max(layer.physical_length for layer in layers)
        if not first.packed and any(layer.physical_length != length for layer in layers):
            raise ValueError("dense caches stack only when every row keeps the same number of entries per head")
        parts = [
            [_pad_entries(getattr(layer, name), length, fill) for layer in layers]
            for name, fill in (("keys", 0), ("values", 0), ("positions", 0), ("heads", -1))
        ]
        layer = CompressedLayer()
        layer.set_compressed(CompressedKV(*(torch.cat(part) for part in parts)), logical_length=first.logical_length,
                             kv_heads=first.kv_heads)
        stacked.layers.append(layer)
    return stacked


def _group_key(config: CompressionConfig | None) -> tuple | None:
    """Configurations with equal keys may share a batch (None: decodes alone)."""
    if config is None:
        return ("full",)
    if config.recent_queries or config.lowrank is not None:
        return None  # the cache changes while decoding, or holds low-rank entries
    return (config.method_impl.layout, config.compression_ratio)


@torch.no_grad()
def answer_configs(
    model: PreTrainedModel,
    context_ids: Tensor,
    appended_ids: Tensor | None,
    configs: Sequence[dict | None],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[Tensor]:
    """Greedy answer tokens [1, t] for each configuration (options, or None for the full cache)
    after ``context_ids`` [1, n] (prefilled once, then compressed per configuration) and
    ``appended_ids`` fed on the compressed cache (None: query-aware, the context holds the question)."""
    if context_ids.shape[0] != 1:
        raise ValueError(f"answer_configs takes one prompt at a time (its configurations form the batch); got "
                         f"{context_ids.shape[0]} rows")
    prefill = capture_prefill(model, context_ids)
    parsed = [None if options is None else CompressionConfig.from_options(options) for options in configs]
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(parsed):
        key = _group_key(config)
        groups.setdefault(key if key is not None else ("alone", index), []).append(index)
    answers: list[Tensor | None] = [None] * len(configs)
    scored: dict[str, list] = {}  # a method's scores, computed once for all its ratios
    for indices in groups.values():
        caches = [compress_prefill(model, prefill, parsed[i], _scores(scored, prefill, parsed[i])).cache
                  for i in indices]
        for batch in _stackable_batches(caches):
            rows = [indices[i] for i in batch]
            config = parsed[rows[0]]
            if len(batch) == 1:
                cache = caches[batch[0]]
            else:
                cache = stack_caches([caches[i] for i in batch])
            decoded = _decode(model, prefill, config, cache, appended_ids, max_new_tokens, eos_token_id)
            for row, tokens in zip(rows, decoded, strict=True):
                answers[row] = tokens
            del cache
        del caches
    return answers


def _scores(scored: dict[str, list], prefill: CapturedPrefill, config: CompressionConfig | None) -> list | None:
    if config is None or not config.evicts:
        return None
    key = repr(config.method_impl)  # the method with all its options, not the ratio
    if key not in scored:
        scored[key] = prefill_scores(config, prefill)
    return scored[key]


def _stackable_batches(caches: Sequence[CompressedCache]) -> list[list[int]]:
    """Indices of ``caches`` split into batches that stack: dense caches by their per-layer lengths."""
    batches: dict[tuple, list[int]] = {}
    for index, cache in enumerate(caches):
        packed = any(layer.packed for layer in cache.layers)
        key = ("packed",) if packed else tuple(layer.physical_length for layer in cache.layers)
        batches.setdefault(key, []).append(index)
    return list(batches.values())


def _decode(
    model: PreTrainedModel,
    prefill: CapturedPrefill,
    config: CompressionConfig | None,
    cache: CompressedCache,
    appended_ids: Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> list[Tensor]:
    batch, n = cache.layers[0].keys.shape[0], prefill.logits.shape[1]
    mask = torch.ones(batch, n, dtype=torch.long, device=prefill.logits.device)
    first = prefill.logits[:, -1].argmax(dim=-1, keepdim=True)
    step = chunk_step(model, cache)
    with _grouped_query_sdpa(cache.layers[0].keys.device):
        return _decode_steps(model, config, cache, step, first, mask, appended_ids, max_new_tokens, eos_token_id)


@contextmanager
def _grouped_query_sdpa(device: torch.device):
    """Let transformers' SDPA attention read each KV head once for its query group instead of copying
    it per query head. On the CPU the outputs are bitwise the same, and a batch of caches is not
    copied three times per layer."""
    if device.type != "cpu":
        yield
        return
    saved = os.environ.get(FORCE_GQA)
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[FORCE_GQA]
        else:
            os.environ[FORCE_GQA] = saved


def _decode_steps(model, config, cache, step, first, mask, appended_ids, max_new_tokens, eos_token_id):
    if config is not None and config.recent_queries:
        # Decode-time compression and LAQ's rollout: capture every step's queries, as reference_decode.
        with capture_prefill_attention(model, decode=True) as captured:
            recording = RecordingStep(config, step, cache, captured, model)
            if config.method_impl.lookahead_queries:
                lookahead_stage(config, recording, cache, first, mask, eos_token_id)
                recording = step
            return greedy_answers(recording, mask, appended_ids, first, max_new_tokens, eos_token_id)
    packed = any(layer.packed or layer.lowrank for layer in cache.layers)
    if not packed:
        extra = (appended_ids.shape[1] if appended_ids is not None else 0) + max_new_tokens
        cache.layers[:] = [ReservedLayer.reserving(layer, extra) for layer in cache.layers]
    with attention_implementation(model, ATTENTION_IMPLEMENTATION if packed else model.config._attn_implementation):
        return greedy_answers(step, mask, appended_ids, first, max_new_tokens, eos_token_id)


__all__ = ["answer_configs", "chunk_step", "greedy_answers", "stack_caches"]
