"""KNorm: "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (Devoto et al.,
EMNLP 2024, arXiv 2406.11430).

Keys with a small L2 norm tend to draw high attention, so the score is ``-||k_j||_2`` on the
post-RoPE cached keys, per KV head (kvpress's ``KnormPress``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvc_compile.methods.base import Method, ScoreInputs


@dataclass(frozen=True)
class KNorm(Method):
    name = "knorm"
    paper = "arXiv 2406.11430"
    queries_read = 0

    def score(self, inputs: ScoreInputs) -> Tensor:
        return -inputs.keys.float().norm(dim=-1)
