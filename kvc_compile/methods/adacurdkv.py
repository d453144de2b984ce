"""AdaCurDKV: CurDKV scores with AdaKV head-adaptive budgets, from "Value-Guided KV Compression for
LLMs via Approximated CUR Decomposition" (Sengupta, Chaudhary, Chakraborty; NeurIPS 2025,
arXiv 2509.15038), selection after "Ada-KV" (Feng et al., arXiv 2407.11550).

The scores are CurDKV's (``kvc_compile.methods.curdkv``). Instead of every KV head keeping the
same ``n_kept`` tokens, the layer keeps its best ``kv_heads * n_kept`` (head, token) pairs, so heads
whose value/key mass is concentrated hand slots to heads where it is spread; each head first keeps
its own top ``int(n_kept * alpha_safeguard)`` tokens so no head is starved. ``alpha_safeguard=0.2``
is the AdaKV and kvpress ``AdaKVPress`` default; the paper describes the variant as pooled top-k
with this safeguard (the authors' exact wiring could not be checked). Heads keep different counts,
so the cache uses the packed layout and evicted entries are really freed (kvpress masks them
logically instead).

CurDKV's scores sum to 1 per head, so pooling them compares each token's share of its own head's
mass: a head with a few dominant tokens gives up its tail to a head with many comparable ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvc_compile.methods.adakv import check_alpha
from kvc_compile.methods.capabilities import PackedLayout
from kvc_compile.methods.curdkv import CurDKV
from kvc_compile.methods.selection import select_head_adaptive


@dataclass(frozen=True)
class AdaCurDKV(PackedLayout, CurDKV):
    name = "adacurdkv"
    paper = "arXiv 2509.15038"

    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.name, self.alpha_safeguard)

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        return select_head_adaptive(scores, valid, n_kept, self.alpha_safeguard)
