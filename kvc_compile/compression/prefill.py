"""Prefill compression of one attention site (or of every layer at once): score, select, gather.

``compress_layer`` is what ``kvc::compress_kv`` computes and the eager reference calls; the
method decides what is worth keeping (``kvc_compile.methods``), these functions lay the kept entries
out (``kvc_compile.compression.layout``). All of it is SymInt-safe: a prompt length may be symbolic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.compression.layout import (
    INDEX_DTYPE,
    CompressedKV,
    dense_heads,
    keep_dense,
    pack_entries,
    prefill_entries,
)
from kvc_compile.methods.base import Method, ScoreInputs
from kvc_compile.methods.kernels import active_kernels
from kvc_compile.methods.selection import EXCLUDED


def compress_layer(method: Method, n_kept, inputs: ScoreInputs, scores: Tensor | None = None) -> CompressedKV:
    """Score, select and gather one layer. ``n_kept``: tokens per KV head on average over the model.
    ``scores``: the layer's ``method.score(inputs)`` when already computed (scores never depend on
    ``n_kept``, so one scoring serves every compression ratio).

    The outputs are fresh tensors (never views of the inputs), as a custom op's outputs must be.
    """
    keys, values, valid = inputs.keys, inputs.values, inputs.valid
    batch, kv_heads, n, head_dim = keys.shape
    n_kept = method.layer_kept_length(n_kept, n, inputs.layer_idx, inputs.n_layers)
    if method.layout == "dense":
        if n_kept >= n:
            positions, heads = prefill_entries(batch, kv_heads, n, keys.device)
            # Contiguous copies: the fake kernel promises the layout of a fresh tensor, and a plain
            # clone would keep the strides of a transposed input (Inductor asserts them).
            fresh = torch.contiguous_format
            return CompressedKV(keys.clone(memory_format=fresh), values.clone(memory_format=fresh), positions, heads)
        scores = method.score(inputs) if scores is None else scores
        select_and_gather = active_kernels().select_and_gather
        if select_and_gather is None or type(method).select is not Method.select:
            return keep_dense(keys, values, method.select(scores, valid, n_kept))
        # Uniform selection on the GPU: a radix select and a compaction kernel that gathers as it goes.
        masked = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
        kept_keys, kept_values, kept = select_and_gather(masked, keys, values, n_kept)
        return CompressedKV(kept_keys, kept_values, kept.to(INDEX_DTYPE), dense_heads(kept))
    if n_kept >= n:
        flat = torch.arange(kv_heads * n, device=keys.device).expand(batch, kv_heads * n)
    else:
        flat = method.select(method.score(inputs) if scores is None else scores, valid, n_kept)
    return pack_entries(keys, values, flat, valid)


def compress_layers_jointly(
    method: Method, n_kept: int, layer_scores: list[Tensor], keys: list[Tensor], values: list[Tensor], valid: Tensor
) -> list[CompressedKV]:
    """Select and gather every layer at once, for methods whose layer budgets depend on all layers.

    ``method.layer_budgets`` gives each row and layer its tokens per KV head; each layer is then
    selected row by row and packed, a row that keeps fewer entries than the layer's longest row
    being padded with head -1 slots.
    """
    if method.layout != "packed":
        raise ValueError(f"{method.name}: budgets across layers need the packed layout")
    batch, kv_heads, n, _ = keys[0].shape
    if n_kept >= n:
        flat = torch.arange(kv_heads * n, device=valid.device).expand(batch, kv_heads * n)
        return [pack_entries(k, v, flat, valid) for k, v in zip(keys, values, strict=True)]
    budgets = method.layer_budgets(layer_scores, valid, n_kept).tolist()
    compressed = []
    for layer, (scores, layer_keys, layer_values) in enumerate(zip(layer_scores, keys, values, strict=True)):
        rows = [
            method.select(scores[row : row + 1], valid[row : row + 1], budgets[row][layer])[0] for row in range(batch)
        ]
        flat = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        compressed.append(pack_entries(layer_keys, layer_values, flat, valid))
    return compressed


def compressed_shapes(method: Method, n_kept, batch: int, kv_heads: int, n, layer_idx: int, n_layers: int):
    """(entry axis shape [batch, heads_axis, length]) of ``compress_layer``'s outputs, SymInt-safe."""
    n_kept = method.layer_kept_length(n_kept, n, layer_idx, n_layers)
    if method.layout == "dense":
        return (batch, kv_heads, n_kept)
    return (batch, 1, kv_heads * n_kept)
