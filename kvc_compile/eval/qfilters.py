"""Calibrating Q-Filters on a model's own queries (``kvc-calibrate --method qfilters``).

The unmodified model runs on calibration text with the reference's capturing attention; for each
compressed layer and KV head, the post-RoPE queries of the head's GQA group are pooled into their
second-moment matrix ``Q^T Q`` and their sum, from which ``fit_filters`` takes the signed principal
direction. Only ``d x d`` statistics are kept per head, so the text may be long.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kvc_compile.methods.qfilters import QueryFilters, fit_filters
from kvc_compile.models.identity import model_identity
from kvc_compile.reference import capture_prefill


@torch.no_grad()
def calibrate_query_filters(model: PreTrainedModel, texts_ids: Sequence[Tensor]) -> QueryFilters:
    """Q-Filters of ``model`` from the given token id sequences ([1, T] each)."""
    gram = query_sum = None
    tokens = 0
    for input_ids in texts_ids:
        sites = capture_prefill(model, input_ids).sites  # the layers the pass compresses, in its order
        queries = torch.stack([site.query[0].float() for site in sites])  # [layers, q_heads, T, d]
        kv_heads = sites[0].keys.shape[1]
        layers, q_heads, length, head_dim = queries.shape
        grouped = queries.reshape(layers, kv_heads, (q_heads // kv_heads) * length, head_dim).double()
        step_gram, step_sum = grouped.mT @ grouped, grouped.sum(dim=2)
        gram = step_gram if gram is None else gram + step_gram
        query_sum = step_sum if query_sum is None else query_sum + step_sum
        tokens += length
    if gram is None:
        raise ValueError("Q-Filters need at least one calibration sequence")
    filters = fit_filters(gram, query_sum)
    # Share of each head's query energy along its filter: how anisotropic the head is (1 = a line).
    eigenvalues = torch.linalg.eigvalsh(gram)
    explained = (eigenvalues[..., -1] / eigenvalues.sum(-1)).float()
    settings = {"sequences": len(texts_ids), "tokens": tokens, "explained": explained.tolist()}
    return QueryFilters(filters, model_identity(model), settings)
