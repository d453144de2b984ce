"""SnapKV: "SnapKV: LLM Knows What You Are Looking for Before Generation" (Li et al., NeurIPS 2024,
arXiv 2404.14469).

The last ``window_size`` prompt queries (the observation window) vote for the prefix keys they
attend to; votes are smoothed by 1-D pooling so neighbours of important tokens survive, and the
window itself is always kept. Defaults and semantics follow kvpress's ``SnapKVPress`` (window
64, average pooling with kernel 5, votes averaged over the GQA group, window inside the budget);
the paper's LongBench setting is ``window_size=32, kernel_size=7, pooling="max"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, Method, ScoreInputs, gqa_mean

POOLINGS = ("avg", "max")


def check_window_options(method: str, window_size: int, kernel_size: int, pooling: str) -> None:
    """Validate the observation-window options shared by SnapKV-style scorers."""
    if window_size <= 0:
        raise ValueError(f"{method}: window_size must be a positive integer, got {window_size}")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(
            f"{method}: kernel_size must be a positive odd integer (pooling keeps the length), got {kernel_size}"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"{method}: unknown pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class SnapKV(Method):
    name = "snapkv"
    paper = "arXiv 2404.14469"

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        check_window_options(self.name, self.window_size, self.kernel_size, self.pooling)

    @property
    def min_uncompressed_length(self) -> int:
        return self.window_size

    @property
    def queries_read(self) -> int:
        return self.window_size

    def pool(self, votes: Tensor) -> Tensor:
        """1-D pooling along the token axis (zero padding, length kept): neighbours of a hit survive."""
        pad = self.kernel_size // 2
        if self.pooling == "avg":
            return F.avg_pool1d(votes, self.kernel_size, stride=1, padding=pad)
        return F.max_pool1d(votes, self.kernel_size, stride=1, padding=pad)

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys, w = inputs.keys, self.window_size
        n = keys.shape[2]
        votes = self.pool(inputs.window_votes(w)[..., : n - w] / w)
        scores = gqa_mean(votes, keys.shape[1])
        return F.pad(scores, (0, w), value=PROTECTED)
