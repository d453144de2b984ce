"""CriticalKV: "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective"
(Feng, Lv, Cao, Xie, Zhou; arXiv 2502.03805).

A wrapper that refines any attention-based scorer with the value path. Evicting entry ``j`` perturbs
the layer's output by about its attention times what its value adds through the output projection,
so the second stage ranks entries by ``(score_j + epsilon) * mean_h ‖W_O^h v_j‖₁`` (the L1 norm over
the hidden size of value ``j`` through query head ``h``'s slice of ``o_proj``, averaged over the KV
head's query heads). Attention alone is a good first guess, so a first share of the budget
(``first_stage_ratio``) is kept by the inner scorer's own ranking, and the rest by the value-weighted
one.

Defaults follow kvpress's ``CriticalKVPress`` (SnapKV scorer, ``epsilon=1e-4``,
``first_stage_ratio=0.5``); the paper's Algorithm 1 has the same two stages. As in kvpress, a GQA
group's norms are averaged. The first stage keeps ``int(n_kept * first_stage_ratio)`` entries per
head, where kvpress computes ``int((1 - ratio) * n * first_stage_ratio)`` (equal up to rounding).

Its scores are the two stages stacked ([2, batch, kv_heads, n]: the inner scorer's, then the
value-weighted ones), read by its own ``select``; so it wraps only scorers of uniform budgets and
compresses at prefill only (decoding steps have no ``o_proj`` weight at their sites).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import ScoreInputs
from kvc_compile.methods.capabilities import ReadsOutputProjection
from kvc_compile.methods.selection import select_two_stage
from kvc_compile.methods.wrapped import ScorerWrapper


def check_two_stage(method: str, epsilon: float, first_stage_ratio: float) -> None:
    if not 0 <= first_stage_ratio <= 1:
        raise ValueError(f"{method}: first_stage_ratio must be in [0, 1] (share of each head's budget kept by the "
                         f"scorer's own ranking), got {first_stage_ratio}")
    if epsilon < 0:
        raise ValueError(f"{method}: epsilon must be >= 0 (added to each score before weighting), got {epsilon}")


@dataclass(frozen=True)
class CriticalKV(ReadsOutputProjection, ScorerWrapper):
    name = "criticalkv"
    paper = "arXiv 2502.03805"

    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        check_two_stage(self.name, self.epsilon, self.first_stage_ratio)
        super().__post_init__()

    @property
    def decoding_queries(self) -> int | None:
        return None  # prefill only: decode graphs hand the op no output projection

    def score(self, inputs: ScoreInputs) -> Tensor:
        first = self.inner.score(inputs).float()
        weighted = (first + self.epsilon) * inputs.output_norms(self.name)
        # Protected (window) and excluded entries keep their infinite scores whatever the norm.
        return torch.stack([first, torch.where(torch.isinf(first), first, weighted)])

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        return select_two_stage(scores[0], scores[1], valid, n_kept, self.first_stage_ratio)
