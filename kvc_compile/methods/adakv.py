"""AdaKV: "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (Feng, Lv, Cao, Xie, Zhou; arXiv 2407.11550).

Head-wise adaptive budgets around any scorer: the scores of all KV heads of a layer compete for
one budget of ``kv_heads * n_kept`` entries, so heads whose attention is concentrated give
slots to heads whose attention is spread. Each head first keeps its own top
``int(n_kept * alpha_safeguard)`` tokens (defaults follow kvpress's ``AdaKVPress``: SnapKV scorer,
``alpha_safeguard=0.2``). kvpress masks the evicted keys and frees nothing; here the cache is
stored in the packed per-head layout, so the evicted entries' memory is released.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvc_compile.methods.capabilities import PackedLayout
from kvc_compile.methods.selection import select_head_adaptive
from kvc_compile.methods.wrapped import ScorerWrapper


def check_alpha(method: str, alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"{method}: alpha_safeguard must be in [0, 1] (fraction of a head's budget it always "
                         f"keeps), got {alpha}")


@dataclass(frozen=True)
class AdaKV(PackedLayout, ScorerWrapper):
    name = "adakv"
    paper = "arXiv 2407.11550"

    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        check_alpha(self.name, self.alpha_safeguard)
        super().__post_init__()

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        return select_head_adaptive(scores, valid, n_kept, self.alpha_safeguard)
