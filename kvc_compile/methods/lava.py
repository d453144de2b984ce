"""LAVa: "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation" (Shen, Yuan, Zhang,
Wang, Jiang, Nguyen; EMNLP 2025 Findings, arXiv 2509.09754).

The loss a layer's attention output suffers from evicting token ``i`` of head ``h`` is bounded by
its window attention times the head's largest value L1 norm, so the score is SnapKV's window
attention (max-pooled) scaled by ``max_i ||v_i||_1`` of the head; over a GQA group the maximum is
taken (keep a token if any query head needs it). Because the scale makes heads comparable, heads
share the layer's budget (AdaKV-style selection with a 0.2 floor) and the cache uses the packed
layout. Defaults follow the official code (window 32, max pooling kernel 7, floor 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.adakv import check_alpha
from kvc_compile.methods.base import PROTECTED, ScoreInputs, gqa_max, select_head_adaptive
from kvc_compile.methods.snapkv import SnapKV, window_attention


@dataclass(frozen=True)
class LAVa(SnapKV):
    name = "lava"
    paper = "arXiv 2509.09754"
    layout = "packed"

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.name, self.alpha_safeguard)

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys, values, valid, w = inputs.keys, inputs.values, inputs.valid, self.window_size
        n, kv_heads = keys.shape[2], keys.shape[1]
        votes = window_attention(inputs.queries, keys, valid, w)[..., : n - w].mean(dim=-2)
        votes = self.pool(votes)
        prefix_norms = values[:, :, : n - w].float().abs().sum(dim=-1).masked_fill(~valid[:, None, : n - w], 0.0)
        head_scale = prefix_norms.amax(dim=-1, keepdim=True)  # [batch, kv_heads, 1]
        scores = gqa_max(votes, kv_heads) * head_scale
        return F.pad(scores, (0, w), value=PROTECTED)

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        return select_head_adaptive(scores, valid, n_kept, self.alpha_safeguard)
