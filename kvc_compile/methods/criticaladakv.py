"""CriticalAdaKV: CriticalKV's two stages inside AdaKV's head-adaptive budgets (arXiv 2502.03805,
the adaptive variant; budgets after "Ada-KV", arXiv 2407.11550).

The inner scorer's scores of all KV heads compete for the layer's ``kv_heads * n_kept`` entries,
each head first keeping its own top ``int(n_kept * alpha_safeguard)`` (AdaKV's allocation); then each
head fills its budget as CriticalKV does: its best ``floor(budget * first_stage_ratio)`` by the
scorer, the rest by ``(score + epsilon) * ‖W_O v‖₁``. Defaults follow kvpress's
``CriticalAdaKVPress`` (SnapKV, ``alpha_safeguard=0.2``, ``epsilon=1e-4``, ``first_stage_ratio=0.5``).
kvpress masks the evicted keys; here heads keep different counts in the packed layout, so the
evicted entries' memory is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvc_compile.methods.adakv import check_alpha
from kvc_compile.methods.capabilities import PackedLayout
from kvc_compile.methods.criticalkv import CriticalKV
from kvc_compile.methods.selection import select_two_stage_head_adaptive


@dataclass(frozen=True)
class CriticalAdaKV(PackedLayout, CriticalKV):
    name = "criticaladakv"

    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        check_alpha(self.name, self.alpha_safeguard)
        super().__post_init__()

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        return select_two_stage_head_adaptive(scores[0], scores[1], valid, n_kept, self.alpha_safeguard,
                                              self.first_stage_ratio)
