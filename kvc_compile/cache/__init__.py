"""Compressed KV caches compatible with transformers' ``Cache``.

After compression a layer holds ``k < n`` tokens but has seen ``n``: the next token's RoPE
position is ``n`` (logical), while attention spans ``k + 1`` keys (physical). ``CompressedCache``
tracks both. Masks use the physical length with the offset ``n - k``, so the 2-D attention mask
(logical, as ``generate`` keeps it) lines up with the kept tokens: kept indices are stored in
ascending order, so with left padding any padding slot a short row had to keep comes first, at
a logical position the mask marks as padding.

A plain ``DynamicCache`` also works for unpadded batches under ``generate()``, which passes
logical positions itself; use ``CompressedCache`` for padded batches and for direct forward
calls without positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class CompressedLayer(DynamicLayer):
    """A ``DynamicLayer`` that also counts the tokens it has seen (its logical length)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.logical_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.logical_length += key_states.shape[-2]
        return keys, values

    @property
    def physical_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.logical_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized:
            return query_length, 0
        return self.physical_length + query_length, self.logical_length - self.physical_length

    def crop(self, tokens_to_remove: int) -> None:
        before = self.physical_length
        super().crop(tokens_to_remove)
        self.logical_length -= before - self.physical_length

    def set_compressed(self, keys: torch.Tensor, values: torch.Tensor, logical_length: int) -> None:
        """Replace the stored tokens by a compressed set that stands for ``logical_length`` tokens."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values, self.logical_length = keys, values, logical_length


class CompressedCache(DynamicCache):
    """A dynamic cache whose layers keep logical and physical lengths apart."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=CompressedLayer)

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length for layer in self.layers]


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of a cache (measured from the tensors)."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def kept_tokens_per_layer(cache: Cache) -> list[int]:
    """Tokens each layer physically stores, per KV head."""
    return [layer.keys.shape[-2] if layer.keys is not None else 0 for layer in cache.layers]


__all__ = ["CompressedCache", "CompressedLayer", "cache_nbytes", "kept_tokens_per_layer"]
