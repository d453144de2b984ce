"""Calibrating low-rank KV projections (KQ-SVD and its baselines) on a model's own activations,
saving them, and measuring how faithful they are on held-out text.

``calibrate_lowrank`` runs the unmodified model on calibration text with the reference's
capturing attention, collects each layer's post-RoPE keys and queries (the queries of a GQA group
stacked) and values, and fits the factors of ``kvc_compile.methods.kqsvd``. The result,
``LowRankProjections``, is saved with safetensors together with the model's identity and the
settings, and a file that does not fit the model it is used with is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kvc_compile.compression.lowrank import LowRankProjections
from kvc_compile.methods.kqsvd import (
    KEY_FACTORS,
    LOWRANK_METHODS,
    VALUE_FACTORS,
    check_rank,
    rank_for_error,
    relative_error,
)
from kvc_compile.models.identity import model_identity
from kvc_compile.reference import capture_prefill_attention


@dataclass
class LayerActivations:
    keys: Tensor  # [kv_heads, T, d], post-RoPE
    queries: Tensor  # [kv_heads, m T, d], post-RoPE, the m query heads of each group stacked
    values: Tensor  # [kv_heads, T, d]


@torch.no_grad()
def collect_activations(model: PreTrainedModel, texts_ids: Sequence[Tensor]) -> list[LayerActivations]:
    """Every layer's keys, grouped queries and values over the given token id sequences ([1, T] each)."""
    per_layer: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for input_ids in texts_ids:
        with capture_prefill_attention(model) as captured:
            model.forward(input_ids=input_ids, use_cache=True)
        for layer_idx, (query, keys, values, *_) in captured.items():
            kv_heads = keys.shape[1]
            group = query.shape[1] // kv_heads
            grouped = query[0].reshape(kv_heads, group * query.shape[2], query.shape[3])  # head-major, then tokens
            per_layer.setdefault(layer_idx, []).append((keys[0].float(), grouped.float(), values[0].float()))
    return [
        LayerActivations(*(torch.cat([chunk[i] for chunk in per_layer[layer]], dim=1) for i in range(3)))
        for layer in sorted(per_layer)
    ]


def output_blocks(model: PreTrainedModel, layer_idx: int) -> Tensor:
    """``W_O^h`` of every query head, [q_heads, d, hidden]: head ``h``'s output times it enters the model."""
    attention = model.base_model.layers[layer_idx].self_attn
    weight = attention.o_proj.weight.detach().float()  # [hidden, q_heads * d]
    q_heads, d = model.config.num_attention_heads, attention.head_dim
    return weight.T.reshape(q_heads, d, weight.shape[0])


@torch.no_grad()
def calibrate_lowrank(
    model: PreTrainedModel,
    texts_ids: Sequence[Tensor],
    method: str = "kqsvd",
    rank: int | None = None,
    max_error: float = 0.1,
) -> LowRankProjections:
    """Fit per-layer, per-KV-head projections on calibration token ids.

    ``rank`` fixes the rank of every layer; without it each layer takes the smallest rank whose
    relative Frobenius error on its (head-averaged) spectrum is at most ``max_error`` (keys: the
    spectrum of ``K Q^T`` for KQ-SVD, of what the baseline decomposes otherwise; values: of ``V W_O``).
    """
    if method not in LOWRANK_METHODS:
        raise ValueError(f"unknown low-rank method {method!r}; valid choices: {', '.join(LOWRANK_METHODS)}")
    fit_keys, fit_values = KEY_FACTORS[method], VALUE_FACTORS[method]
    activations = collect_activations(model, texts_ids)
    head_dim = activations[0].keys.shape[-1]
    if rank is not None:
        check_rank(rank, head_dim)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    key_down, key_up, value_down, value_up, key_ranks, value_ranks = [], [], [], [], [], []
    for layer_idx, layer in enumerate(activations):
        blocks = output_blocks(model, layer_idx)
        keys = [fit_keys(layer.keys[h], layer.queries[h], head_dim) for h in range(layer.keys.shape[0])]
        vals = [fit_values(layer.values[h], blocks[h * group : (h + 1) * group], head_dim)
                for h in range(layer.keys.shape[0])]
        key_down.append(torch.stack([f.down for f in keys]).float())
        key_up.append(torch.stack([f.up for f in keys]).float())
        value_down.append(torch.stack([f.down for f in vals]).float())
        value_up.append(torch.stack([f.up for f in vals]).float())
        if rank is not None:
            key_ranks.append(rank)
            value_ranks.append(rank)
        else:
            key_ranks.append(rank_for_error(torch.stack([pad(f.spectrum, head_dim) for f in keys]), max_error))
            value_ranks.append(rank_for_error(torch.stack([pad(f.spectrum, head_dim) for f in vals]), max_error))
    settings = {
        "rank": rank,
        "max_error": None if rank is not None else max_error,
        "calibration_tokens": int(sum(ids.shape[-1] for ids in texts_ids)),
    }
    return LowRankProjections(method, key_down, key_up, value_down, value_up, key_ranks, value_ranks,
                              model_identity(model), settings)


def pad(spectrum: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(spectrum, (0, length - spectrum.shape[0]))


@dataclass(frozen=True)
class ProjectionQuality:
    """Relative squared Frobenius errors on held-out activations, averaged over layers."""

    method: str
    rank: int
    keys: float  # K against K A B^T, the keys as the projected queries see them
    scores: float  # K Q^T
    attention_output: float  # the layer's attention output after o_proj (causal softmax, both sides projected)


@torch.no_grad()
def projection_quality(
    model: PreTrainedModel, projections: LowRankProjections, heldout_ids: Tensor, ranks: Sequence[int]
) -> list[ProjectionQuality]:
    """Errors of ``projections`` truncated to each of ``ranks`` (keys and values), on the activations of
    ``heldout_ids`` [1, T]: text the projections were not calibrated on."""
    activations = collect_activations(model, [heldout_ids])
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    exact = []
    for layer_idx, layer in enumerate(activations):
        keys, queries, values = layer.keys.double(), layer.queries.double(), layer.values.double()
        exact.append((keys @ queries.transpose(1, 2), attention_output(model, layer_idx, queries, keys, values, group)))
    rows = []
    for rank in ranks:
        truncated = projections.truncated(rank, rank)
        errors = torch.zeros(3, dtype=torch.float64)
        for layer_idx, (layer, (exact_scores, exact_out)) in enumerate(zip(activations, exact, strict=True)):
            down, up = truncated.key_down[layer_idx].double(), truncated.key_up[layer_idx].double()
            v_down, v_up = truncated.value_down[layer_idx].double(), truncated.value_up[layer_idx].double()
            keys, queries, values = layer.keys.double(), layer.queries.double(), layer.values.double()
            approx_scores = (keys @ down) @ (queries @ up).transpose(1, 2)
            approx_values = (values @ v_down) @ v_up.transpose(1, 2)
            approx_out = attention_output(
                model, layer_idx, queries @ up, keys @ down, approx_values, group, scale=keys.shape[-1] ** -0.5
            )
            errors += torch.tensor([
                relative_error(keys @ down @ up.transpose(1, 2), keys),
                relative_error(approx_scores, exact_scores),
                relative_error(approx_out, exact_out),
            ])
        errors /= len(activations)
        rows.append(ProjectionQuality(projections.method, rank, *errors.tolist()))
    return rows


def attention_output(model, layer_idx, queries, keys, values, group, scale=None) -> Tensor:
    """Causal attention of grouped queries [kv, m T, r] over keys [kv, T, r], then o_proj: [T, hidden]."""
    kv_heads, tokens = keys.shape[0], keys.shape[1]
    q = queries.reshape(kv_heads * group, tokens, queries.shape[-1])
    k = keys.repeat_interleave(group, dim=0)
    v = values.repeat_interleave(group, dim=0)
    heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    blocks = output_blocks(model, layer_idx).double()  # [q_heads, d, hidden]
    return torch.einsum("htd,hdo->to", heads, blocks)
