"""The eager reference: the same method on the same model, with no compile — the oracle.

Prefill runs the unmodified model eagerly with a capturing attention function (registered
through transformers' ``AttentionInterface``, the library's own extension point) that records
each layer's post-RoPE queries, keys, values and mask. Each layer is then compressed by the
method's pure-PyTorch code (all layers at once when their budgets depend on each other) and
stored in a ``CompressedCache``; greedy decoding continues on it
with logical positions, as ``generate()`` does. For decode-time compression (MorphKV, periodic)
and LAQ's rollout, each decoding step's queries are captured too and shifted into the layers'
buffers, and the same pure-PyTorch functions evict or re-score.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvc_compile.cache import CachedKeys, CompressedCache, CompressedLayer, sliding_windows
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION, kvc_attention
from kvc_compile.compression.layout import CompressedKV, prefill_entries
from kvc_compile.compression.lowrank import project_entries
from kvc_compile.config import CompressionConfig
from kvc_compile.inputs import check_prompt_ids
from kvc_compile.lookahead import decode_step, greedy_tokens, lookahead_stage, prompt_position_ids
from kvc_compile.ops.compress import compress_scored_layers, compress_site, raw_site_scores, score_site
from kvc_compile.ops.decode import compress_decode_packed_site, compress_decode_site, last_queries, shift_in
from kvc_compile.passes.manager import SLIDING_LAYERS_NOTE, NoAttentionSiteError
from kvc_compile.transformers_compat import with_cache

CAPTURE_ATTENTION = "kvc_reference_capture"


class CapturedAttention(NamedTuple):
    """What one layer's attention saw in one forward: post-RoPE queries, keys and values, its mask,
    and the layer's output projection weight (``o_proj``, None where it has none)."""

    query: Tensor
    keys: Tensor
    values: Tensor
    mask: Tensor | None
    output_weight: Tensor | None = None


_captured: dict[int, CapturedAttention] | None = None
_capture_decode = False


def _capturing_sdpa(module, query, key, value, attention_mask, **kwargs):
    # Packed layers (per-head budgets) hand attention labelled entries, which only "kvc" attention reads.
    packed = isinstance(key, CachedKeys)
    prefill = not packed and key.shape[-2] == query.shape[-2]  # nothing cached before: a prompt, even of one token
    if _captured is not None and (prefill or _capture_decode):
        o_proj = getattr(module, "o_proj", None)
        output_weight = o_proj.weight if isinstance(o_proj, torch.nn.Linear) else None
        _captured[module.layer_idx] = CapturedAttention(query, key, value, attention_mask, output_weight)
    attend = kvc_attention if packed else sdpa_attention_forward
    return attend(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_sdpa)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)  # the same masks SDPA gets


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str):
    """Run the model with another registered attention implementation, then restore it."""
    original = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


@contextmanager
def capture_prefill_attention(model: PreTrainedModel, decode: bool = False):
    """Within the block, each prefill forward of ``model`` records {layer: ``CapturedAttention``}
    (each decode forward too with ``decode=True``; dense caches only)."""
    global _captured, _capture_decode
    _captured, _capture_decode = {}, decode
    try:
        with attention_implementation(model, CAPTURE_ATTENTION):
            yield _captured
    finally:
        _captured, _capture_decode = None, False


def _rotary_tables(model: PreTrainedModel, values: Tensor, position_ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """cos/sin [batch, 1, n, d] as the model's rotary embedding computes them for these positions."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        return None, None
    cos, sin = rotary(values, position_ids)
    return cos.unsqueeze(1), sin.unsqueeze(1)


@dataclass
class ReferencePrefill:
    cache: CompressedCache
    kept_indices: list[Tensor]  # per layer: kept positions, [batch, kv_heads, k] (dense) or [batch, 1, T] (packed)
    kept_heads: list[Tensor]  # per layer: KV head of each kept entry, same shape (-1: padding slot)
    logits: Tensor  # [batch, n, vocab]


def _as_config(config: CompressionConfig | dict[str, Any]) -> CompressionConfig:
    return config if isinstance(config, CompressionConfig) else CompressionConfig.from_options(config)


def uncompressed(keys: Tensor, values: Tensor) -> CompressedKV:
    """Every prompt entry, as a ``CompressedKV`` (rank compression alone keeps every token)."""
    batch, kv_heads, n, _ = keys.shape
    return CompressedKV(keys, values, *prefill_entries(batch, kv_heads, n, keys.device))


def window_entries(keys: Tensor, values: Tensor, window: int) -> CompressedKV:
    """What a sliding-window layer keeps of its prompt: the last ``window - 1`` entries (copied, so the
    rest is freed), as ``CompressedLayer`` and transformers' ``DynamicSlidingWindowLayer`` keep."""
    entries = uncompressed(keys, values)
    return CompressedKV(*(tensor[:, :, -(window - 1):].clone() for tensor in entries))


def project_layer(compressed: CompressedKV, projections, layer_idx: int, kv_heads: int):
    """The layer's entries projected to low rank, and the factors the cache decodes with."""
    factors = tuple(
        getattr(projections, name)[layer_idx].to(compressed.keys.device)
        for name in ("key_down", "key_up", "value_down", "value_up")
    )
    heads = compressed.heads if compressed.keys.shape[1] != kv_heads else None
    projected = compressed._replace(
        keys=project_entries(compressed.keys, heads, factors[0]),
        values=project_entries(compressed.values, heads, factors[2]),
    )
    return projected, factors


class PrefillSite(NamedTuple):
    """One layer's prefill attention as the compression op takes it (``kvc_compile.ops.compress.
    site_inputs``, in this order): ``layer_idx`` counts among the layers the pass compresses, as the
    pass numbers its sites, and ``n_layers`` is their number."""

    query: Tensor
    keys: Tensor
    values: Tensor
    mask: Tensor | None
    cos: Tensor | None
    sin: Tensor | None
    layer_idx: int
    n_layers: int
    output_weight: Tensor | None = None


class SlidingPrefill(NamedTuple):
    """A sliding-window layer's prompt entries, which it keeps uncompressed, and its window."""

    keys: Tensor
    values: Tensor
    window: int


@dataclass
class CapturedPrefill:
    """One eager prefill of the unmodified model: what every layer's attention saw, and the logits."""

    sites: list[PrefillSite]  # per layer the pass compresses (every layer but sliding-window ones)
    logits: Tensor  # [batch, n, vocab]
    # Sliding-window layers, left uncompressed, by model layer index.
    sliding: dict[int, SlidingPrefill] = field(default_factory=dict)


@torch.no_grad()
def capture_prefill(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> CapturedPrefill:
    """Run the prompt eagerly, recording each layer's post-RoPE queries, keys, values and mask.

    Compression never changes the prefill's hidden states (each layer attends to its full prompt
    before its cache is compressed), so one capture serves every configuration of a prompt.
    """
    check_prompt_ids(input_ids, attention_mask)
    position_ids = prompt_position_ids(input_ids, attention_mask)
    with capture_prefill_attention(model) as captured:
        # .forward, not __call__: a model compiled in place must still run eagerly here.
        out = model.forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **with_cache(CompressedCache(config=model.config)),
            use_cache=True,
        )
    windows = sliding_windows(model.config)
    layers = [layer_idx for layer_idx in sorted(captured) if layer_idx not in windows]
    sites = []
    for site_idx, layer_idx in enumerate(layers):
        attention = captured[layer_idx]
        cos, sin = _rotary_tables(model, attention.values, position_ids)
        sites.append(PrefillSite(attention.query, attention.keys, attention.values, attention.mask, cos, sin, site_idx,
                                 len(layers), attention.output_weight))
    sliding = {layer_idx: SlidingPrefill(captured[layer_idx].keys, captured[layer_idx].values, windows[layer_idx])
               for layer_idx in windows}
    return CapturedPrefill(sites, out.logits, sliding)


@torch.no_grad()
def compress_prefill(
    model: PreTrainedModel,
    prefill: CapturedPrefill,
    config: CompressionConfig | dict[str, Any] | None,
    scores: list[Tensor] | None = None,
) -> ReferencePrefill:
    """A fresh cache holding ``prefill``'s layers compressed by the reference method (None: every
    entry). The captured tensors are only read, so one capture serves many configurations.
    ``scores``: every layer's ``prefill_scores`` for this method, when already computed."""
    config = None if config is None else _as_config(config)
    if config is not None:
        config.check_model(model)  # the check the compiled path makes: KQ-SVD projections of this model
    sites = prefill.sites
    if config is not None and not sites:
        raise NoAttentionSiteError(f"kvc: {type(model).__name__} has no layer to compress. {SLIDING_LAYERS_NOTE}")
    evicts = config is not None and config.evicts
    lowrank = config is not None and config.lowrank is not None
    if not evicts:
        compressed_layers = [uncompressed(site.keys, site.values) for site in sites]
    elif config.method_impl.budgets_across_layers:
        scores = scores if scores is not None else prefill_scores(config, prefill)
        keys, values = [site.keys for site in sites], [site.values for site in sites]
        compressed_layers = compress_scored_layers(config, scores, keys, values, sites[0].mask)
    else:
        layer_scores = scores if scores is not None else [None] * len(sites)
        compressed_layers = [
            compress_site(config, *site, scores=layer) for site, layer in zip(sites, layer_scores, strict=True)
        ]
    # Decode-time scorers and LAQ's second stage vote with the prompt's last queries.
    recent = None
    if config is not None and config.recent_queries:
        recent = [last_queries(site.query, config.recent_queries) for site in sites]
    keeps_prompt = evicts and config.method_impl.lookahead_queries > 0
    cache = CompressedCache()
    kept_indices, kept_heads = [], []
    for position, (site, compressed) in enumerate(zip(sites, compressed_layers, strict=True)):
        _add_sliding_layers(cache, prefill.sliding, kept_indices, kept_heads)
        keys = site.keys
        factors = None
        if lowrank:
            compressed, factors = project_layer(compressed, config.projections, site.layer_idx, keys.shape[1])
        layer = CompressedLayer()
        layer.set_compressed(
            compressed, logical_length=keys.shape[2], kv_heads=keys.shape[1], factors=factors,
            recent_queries=None if recent is None else recent[position],
        )
        if keeps_prompt:  # LAQ's stage 2 re-scores the full prompt
            layer.prompt_keys, layer.prompt_values = keys, site.values
        cache.layers.append(layer)
        kept_indices.append(compressed.positions)
        kept_heads.append(compressed.heads)
    _add_sliding_layers(cache, prefill.sliding, kept_indices, kept_heads)
    return ReferencePrefill(cache, kept_indices, kept_heads, prefill.logits)


def _add_sliding_layers(cache: CompressedCache, sliding: dict[int, SlidingPrefill], kept_indices: list,
                        kept_heads: list) -> None:
    """Append the sliding-window layers that come next in the model's order (each keeps its window)."""
    while len(cache.layers) in sliding:
        prompt = sliding[len(cache.layers)]
        layer = CompressedLayer(sliding_window=prompt.window)
        entries = window_entries(prompt.keys, prompt.values, prompt.window)
        layer.set_compressed(entries, logical_length=prompt.keys.shape[2], kv_heads=prompt.keys.shape[1])
        cache.layers.append(layer)
        kept_indices.append(entries.positions)
        kept_heads.append(entries.heads)


def prefill_scores(config: CompressionConfig, prefill: CapturedPrefill) -> list[Tensor | None]:
    """Every layer's scores as ``compress_prefill`` computes them; they do not depend on the ratio."""
    if config.method_impl.budgets_across_layers:
        return [score_site(config, *site) for site in prefill.sites]
    return [raw_site_scores(config, *site) for site in prefill.sites]


@torch.no_grad()
def reference_prefill(
    model: PreTrainedModel,
    input_ids: Tensor,
    config: CompressionConfig | dict[str, Any],
    attention_mask: Tensor | None = None,
) -> ReferencePrefill:
    """Run the prompt eagerly and compress every layer's cache with the reference method."""
    config = _as_config(config)
    return compress_prefill(model, capture_prefill(model, input_ids, attention_mask), config)


@dataclass
class ReferenceGeneration:
    tokens: Tensor  # [batch, max_new_tokens] greedy tokens
    cache: CompressedCache  # the cache after the last decoding step (the last token is not in it)


@torch.no_grad()
def reference_generate(
    model: PreTrainedModel,
    input_ids: Tensor,
    config: CompressionConfig | dict[str, Any],
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Greedy tokens [batch, max_new_tokens] decoded from the reference-compressed cache."""
    return reference_decode(model, input_ids, config, max_new_tokens, attention_mask).tokens


@torch.no_grad()
def reference_decode(
    model: PreTrainedModel,
    input_ids: Tensor,
    config: CompressionConfig | dict[str, Any],
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
) -> ReferenceGeneration:
    """``reference_generate``, also returning the cache (decode-time compression included).

    ``eos_token_id`` only matters to LAQ's rollout, whose pseudo queries stop voting after an EOS.
    """
    config = _as_config(config)
    prefill = reference_prefill(model, input_ids, config, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    first_token = prefill.logits[:, -1].argmax(dim=-1, keepdim=True)
    cache = prefill.cache
    if config.recent_queries:
        # Decode-time compression and LAQ's rollout: each step's queries are captured and shifted
        # into every layer's buffer, and layers grown past the threshold are evicted.
        with capture_prefill_attention(model, decode=True) as captured:
            step = RecordingStep(config, decode_step(model.forward, cache), cache, captured, model)
            if config.method_impl.lookahead_queries:
                lookahead_stage(config, step, cache, first_token, attention_mask, eos_token_id)
                step = decode_step(model.forward, cache)
            tokens = greedy_tokens(step, first_token, attention_mask, max_new_tokens)
        return ReferenceGeneration(tokens, cache)
    packed = any(layer.packed or layer.lowrank for layer in cache.layers)
    with attention_implementation(model, ATTENTION_IMPLEMENTATION if packed else model.config._attn_implementation):
        tokens = greedy_tokens(decode_step(model.forward, cache), first_token, attention_mask, max_new_tokens)
    return ReferenceGeneration(tokens, cache)


class RecordingStep:
    """A reference decoding step that, after the forward, shifts each layer's captured query into its
    buffer and, with decode-time compression, evicts layers grown to ``target_size + decoding_interval``."""

    def __init__(self, config: CompressionConfig, step, cache: CompressedCache, captured: dict,
                 model: PreTrainedModel) -> None:
        self.config, self.step, self.cache, self.captured, self.model = config, step, cache, captured, model

    def __call__(self, token: Tensor, mask: Tensor) -> Tensor:
        logits = self.step(token, mask)
        layers = self.cache.layers
        for layer_idx, layer in enumerate(layers):
            layer.recent_queries = shift_in(layer.recent_queries, self.captured[layer_idx].query)
        evicting = [i for i, layer in enumerate(layers)
                    if self.config.evicts_while_decoding(layer.entries_per_head, i, len(layers))]
        rotary = self._rotary(layers[0].values, token, mask) if evicting else None  # one step: one set of tables
        for layer_idx in evicting:
            layer = layers[layer_idx]
            if layer.packed:
                layer.keys, layer.values, layer.heads, layer.positions = compress_decode_packed_site(
                    self.config, layer.recent_queries, layer.keys, layer.values, layer.heads, layer.positions,
                    layer.kv_heads, layer_idx, len(layers), rotary,
                )
                continue
            layer.keys, layer.values, layer.positions = compress_decode_site(
                self.config, layer.recent_queries, layer.keys, layer.values, layer.positions,
                self.captured[layer_idx].mask, layer_idx, len(layers), rotary,
            )
        return logits

    def _rotary(self, values: Tensor, token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The step's rotary tables and the model's inverse frequencies, for scorers of pre-RoPE
        queries (what the kvc pass hands ``kvc::compress_decode_rotary``)."""
        rotary = getattr(self.model.base_model, "rotary_emb", None)
        if not self.config.method_impl.needs_rotary or rotary is None:
            return None
        position_ids = mask.long().cumsum(-1)[:, -token.shape[1]:] - 1
        cos, sin = _rotary_tables(self.model, values, position_ids)
        return cos, sin, rotary.inv_freq


__all__ = [
    "CapturedAttention",
    "CapturedPrefill",
    "PrefillSite",
    "ReferenceGeneration",
    "ReferencePrefill",
    "capture_prefill",
    "compress_prefill",
    "prefill_scores",
    "reference_decode",
    "reference_generate",
    "reference_prefill",
]
