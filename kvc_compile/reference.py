"""The eager reference: the same method on the same model, with no compile — the oracle.

Prefill runs the unmodified model eagerly with a capturing attention function (registered
through transformers' ``AttentionInterface``, the library's own extension point) that records
each layer's post-RoPE queries, keys, values and mask. Each layer is then compressed by the
method's pure-PyTorch code and stored in a ``CompressedCache``; greedy decoding continues on it
with logical positions, as ``generate()`` does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvc_compile.cache import CompressedCache
from kvc_compile.config import CompressionConfig
from kvc_compile.methods.base import compress_layer
from kvc_compile.ops.compress import valid_keys_from_mask

CAPTURE_ATTENTION = "kvc_reference_capture"
_captured: dict[int, tuple[Tensor, Tensor, Tensor, Tensor | None]] | None = None


def _capturing_sdpa(module, query, key, value, attention_mask, **kwargs):
    if _captured is not None and query.shape[-2] > 1 and key.shape[-2] == query.shape[-2]:
        _captured[module.layer_idx] = (query, key, value, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_sdpa)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)  # the same masks SDPA gets


@contextmanager
def _capture_prefill_attention(model: PreTrainedModel):
    global _captured
    original = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTENTION)
    _captured = {}
    try:
        yield _captured
    finally:
        _captured = None
        model.set_attn_implementation(original)


@dataclass
class ReferencePrefill:
    cache: CompressedCache
    kept_indices: list[Tensor]  # per layer, [batch, kv_heads, n_kept], ascending positions
    logits: Tensor  # [batch, n, vocab]


def _as_config(config: CompressionConfig | dict[str, Any]) -> CompressionConfig:
    return config if isinstance(config, CompressionConfig) else CompressionConfig.from_options(config)


@torch.no_grad()
def reference_prefill(
    model: PreTrainedModel,
    input_ids: Tensor,
    config: CompressionConfig | dict[str, Any],
    attention_mask: Tensor | None = None,
) -> ReferencePrefill:
    """Run the prompt eagerly and compress every layer's cache with the reference method."""
    config = _as_config(config)
    cache = CompressedCache()
    position_ids = None
    if attention_mask is not None:  # left padding: count positions from each row's first real token
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    with _capture_prefill_attention(model) as captured:
        # .forward, not __call__: a model compiled in place must still run eagerly here.
        out = model.forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
    kept_indices = []
    for layer_idx in sorted(captured):
        query, keys, values, mask = captured[layer_idx]
        batch, _, n, _ = keys.shape
        valid = valid_keys_from_mask(mask, batch, n, keys.device)
        kept_keys, kept_values, kept = compress_layer(
            config.method_impl, config.kept_length(n), query, keys, values, valid, layer_idx
        )
        cache.layers[layer_idx].set_compressed(kept_keys, kept_values, logical_length=n)
        kept_indices.append(kept)
    return ReferencePrefill(cache, kept_indices, out.logits)


@torch.no_grad()
def reference_generate(
    model: PreTrainedModel,
    input_ids: Tensor,
    config: CompressionConfig | dict[str, Any],
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Greedy tokens [batch, max_new_tokens] decoded from the reference-compressed cache."""
    prefill = reference_prefill(model, input_ids, config, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    next_token = prefill.logits[:, -1].argmax(dim=-1, keepdim=True)
    generated = [next_token]
    logical = input_ids.shape[1]
    for _ in range(max_new_tokens - 1):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        position_ids = attention_mask.long().cumsum(-1)[:, -1:] - 1
        out = model.forward(
            input_ids=next_token,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache_position=torch.tensor([logical], device=input_ids.device),
            past_key_values=prefill.cache,
            use_cache=True,
        )
        logical += 1
        next_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(next_token)
    return torch.cat(generated, dim=-1)


__all__ = ["ReferencePrefill", "reference_generate", "reference_prefill"]
