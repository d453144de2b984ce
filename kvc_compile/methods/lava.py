"""LAVa: "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation" (Shen, Yuan, Zhang,
Wang, Jiang, Nguyen; EMNLP 2025 Findings, arXiv 2509.09754).

The loss a layer's attention output suffers from evicting token ``i`` of head ``h`` is bounded by
its window attention times the head's largest value L1 norm, so the score is SnapKV's window
attention (max-pooled) scaled by ``max_i ||v_i||_1`` of the head; over a GQA group the maximum is
taken (keep a token if any query head needs it). Because the scale makes heads comparable, heads
share the layer's budget (AdaKV-style selection with a 0.2 floor) and the cache uses the packed
layout. Defaults follow the official code (window 32, max pooling kernel 7, floor 0.2).

Layers share the model's budget too (``layer_allocation="entropy"``, the paper's default): a
layer whose scores are spread out (high normalised entropy ``e_l = H(p_l) / log(#entries)`` of
its flattened prefix scores ``p_l = s_l / sum(s_l)``) needs more entries than one whose scores
are concentrated, so layer ``l`` keeps ``B_l = e_l / sum_m e_m * L * (B - w)`` prefix tokens per
head on average (plus the window ``w``). The official code reaches these budgets by cascading
during prefill (each new layer's entropy shrinks the earlier layers' budgets, whose score-sorted
selections are truncated); the result is the same selection at the final budgets, computed here
once every layer's scores are known. Differences, on purpose: budgets are rounded cumulatively,
so the layers' total is exactly ``L * (B - w)`` unless a layer's share exceeds its prompt; and
the head floor follows each layer's own budget (the official code leaves it at the average
budget through a misspelt attribute, so low-entropy layers overshoot their budget). During
prefill every LAVa layer's full cache is held until the last layer is scored; after prefill the
cache holds the budget. ``layer_allocation="uniform"`` gives every layer the average budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.adakv import check_alpha
from kvc_compile.methods.base import PROTECTED, ScoreInputs, gqa_max
from kvc_compile.methods.capabilities import LayerBudgets
from kvc_compile.methods.selection import select_head_adaptive
from kvc_compile.methods.snapkv import SnapKV

LAYER_ALLOCATIONS = ("entropy", "uniform")


def normalized_entropy(scores: Tensor, valid: Tensor) -> Tensor:
    """Entropy of each row's flattened [kv_heads, n] non-negative scores over its real tokens, divided
    by the log of their number (1: all equal, 0: one entry holds everything). [batch] fp32."""
    kv_heads = scores.shape[1]
    scores = scores.float().clamp(min=0).masked_fill(~valid[:, None, :], 0.0).flatten(1)
    p = scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-30)
    entries = (valid.sum(dim=1) * kv_heads).float().clamp(min=2)
    return -torch.special.xlogy(p, p).sum(dim=1) / torch.log(entries)


@dataclass(frozen=True)
class LAVa(LayerBudgets, SnapKV):
    name = "lava"
    paper = "arXiv 2509.09754"

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    alpha_safeguard: float = 0.2
    layer_allocation: str = "entropy"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.name, self.alpha_safeguard)
        if self.layer_allocation not in LAYER_ALLOCATIONS:
            raise ValueError(
                f"lava: unknown layer_allocation {self.layer_allocation!r}; valid choices: "
                f"{', '.join(LAYER_ALLOCATIONS)} (entropy: layers share the budget by score entropy)"
            )

    @property
    def budgets_across_layers(self) -> bool:
        return self.layer_allocation == "entropy"

    def layer_budgets(self, layer_scores: list[Tensor], valid: Tensor, n_kept: int) -> Tensor:
        w, n_layers = self.window_size, len(layer_scores)
        prefix = layer_scores[0].shape[-1] - w
        entropies = torch.stack(
            [normalized_entropy(scores[..., :prefix], valid[:, :prefix]) for scores in layer_scores], dim=1
        )
        totals = entropies.sum(dim=1, keepdim=True)
        shares = torch.where(totals > 0, entropies / totals.clamp(min=1e-30), 1.0 / n_layers)
        # Cumulative rounding: the layers' floors add up to exactly n_layers * (n_kept - w).
        total_budget = n_layers * (n_kept - w)
        cumulative = (shares.double().cumsum(dim=1) * total_budget).floor().clamp(max=total_budget)
        cumulative[:, -1] = total_budget
        budgets = torch.diff(cumulative, dim=1, prepend=torch.zeros_like(cumulative[:, :1]))
        return budgets.long().clamp(max=prefix) + w

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys, values, valid, w = inputs.keys, inputs.values, inputs.valid, self.window_size
        n, kv_heads = keys.shape[2], keys.shape[1]
        votes = inputs.window_votes(w)[..., : n - w] / w
        votes = self.pool(votes)
        prefix_norms = values[:, :, : n - w].float().abs().sum(dim=-1).masked_fill(~valid[:, None, : n - w], 0.0)
        head_scale = prefix_norms.amax(dim=-1, keepdim=True)  # [batch, kv_heads, 1]
        scores = gqa_max(votes, kv_heads) * head_scale
        return F.pad(scores, (0, w), value=PROTECTED)

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        return select_head_adaptive(scores, valid, n_kept, self.alpha_safeguard)
