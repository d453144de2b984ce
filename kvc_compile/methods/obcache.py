"""OBCache: "OBCache: Optimal Brain KV Cache Pruning for Efficient Long-Context LLM Inference" (Gu,
Liang, Zhao, Diao; arXiv 2510.07651).

Attention-based scores (H2O, SnapKV, TOVA) rank a token by how much attention it gets, ignoring what
evicting it does to the layer's output. OBCache applies Optimal Brain Damage to the per-head
attention output ``o_i = sum_j A_ij v_j`` of a set ``P`` of voting queries: a token's saliency is the
squared output change ``sum_{i in P} ||delta o_i||^2`` its removal causes, to second order. With
``z_ij = q_i.k_j / sqrt(d)`` the logits and ``A`` their causal softmax:

* value pruning (``v_j -> 0``, exact): ``S^V_j = sum_i A_ij^2 ||v_j||^2``;
* key pruning (``k_j -> 0``, so ``z_ij -> 0``; ``d o_i / d z_ij = A_ij (v_j - o_i)``):
  ``S^K_j = sum_i (A_ij z_ij)^2 ||v_j - o_i||^2``;
* joint pruning (both, first order): ``S^KV_j = S^V_j + S^K_j + sum_i 2 A_ij^2 z_ij (||v_j||^2 - v_j.o_i)``.

``base`` picks the policy these scores replace the attention of: ``snapkv`` and ``h2o`` vote with the
last ``window_size`` prompt queries and always keep that window (``snapkv`` then smooths the scores
with a 1-D pool of ``kernel_size`` like SnapKV); ``tova`` votes with the last query only and keeps
only the last token.

Defaults: the tracker defaults of the paper's code (``p = 2`` with the value norm, key, value and
cross terms: ``variant="kv"``) on its SnapKV-style preset (max pool of kernel 7), with SnapKV's
LongBench window of 32; the paper's LongBench scripts size the window as 5 % of the budget instead.
kvpress has no OBCache press.

Differences from the paper's code: it repeats the KV heads before caching, so every query head keeps
its own tokens (no GQA memory saving); here one selection per KV head aggregates the group's scores
(``gqa``: ``mean``, or ``max``). It also scores during decoding (running sums, ``decode_evict``);
this is the prefill-only, one-shot version, and its budget is the framework's (window inside the
budget) rather than the code's recent/heavy split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, Method, ScoreInputs, gqa_max, gqa_mean
from kvc_compile.methods.snapkv import check_window_options

VARIANTS = ("v", "k", "kv")
BASES = ("h2o", "snapkv", "tova")
GQA_AGGREGATIONS = ("mean", "max")


@dataclass(frozen=True)
class OBCache(Method):
    name = "obcache"
    paper = "arXiv 2510.07651"

    variant: str = "kv"
    base: str = "snapkv"
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    gqa: str = "mean"

    def __post_init__(self) -> None:
        for option, value, choices in (
            ("variant", self.variant, VARIANTS),
            ("base", self.base, BASES),
            ("gqa", self.gqa, GQA_AGGREGATIONS),
        ):
            if value not in choices:
                raise ValueError(f"{self.name}: unknown {option} {value!r}; valid choices: {', '.join(choices)}")
        check_window_options(self.name, self.window_size, self.kernel_size, self.pooling)

    @property
    def protected_window(self) -> int:
        """Recent tokens always kept and, with the last of them, the queries that vote."""
        return 1 if self.base == "tova" else self.window_size

    @property
    def min_uncompressed_length(self) -> int:
        return 0 if self.base == "tova" else self.window_size

    @property
    def queries_read(self) -> int:
        return self.protected_window

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys, w = inputs.keys, self.protected_window
        n, kv_heads = keys.shape[2], keys.shape[1]
        saliency = inputs.output_saliency(w, self.variant)[..., : n - w]
        if self.base == "snapkv":
            pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
            saliency = pool(saliency, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        scores = (gqa_mean if self.gqa == "mean" else gqa_max)(saliency, kv_heads)
        return F.pad(scores, (0, w), value=PROTECTED)
