"""Lookahead Q-Cache (LAQ): "Lookahead Q-Cache: Achieving More Consistent KV Eviction via Pseudo
Query" (Wang, Ji, Liu, Xu, Xu, Zhu, Che; EMNLP 2025, arXiv 2505.20334).

Prefill's observation window is made of prompt queries, which need not look like the queries
decoding will ask. LAQ first compresses the prompt with a cheap stage-1 method (SnapKV with the
paper's window 32, max pooling, kernel 7), greedily decodes ``lookahead`` pseudo tokens on that
cache, and lets their queries, with the last ``window_size`` prompt queries (LAQ++; 0 for plain
LAQ), vote on the *full* prompt cache again. The pseudo tokens are then thrown away and decoding
starts over from the first token on the stage-2 cache.

``score`` is stage 1 (what the prefill pass compresses with); ``lookahead_scores`` is stage 2. The
rollout between them is driven by ``kvc_compile.lookahead`` with a static number of steps and no
host sync: a row that emits EOS keeps decoding, and its later pseudo queries are masked out.

Stage 2 follows the official ``update_kv_LAQ``: per voter a softmax over the prompt keys (fp32),
summed over voters, max-pooled, the last ``window_size`` prompt tokens kept. Differences: the
official code repeats KV heads and selects per query head; here votes are averaged over each GQA
group, as SnapKV does, so the cache keeps KV heads. Its stage-2 causal mask over the last voter
columns (which only perturbs the normaliser of window keys, kept anyway) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, ScoreInputs, gqa_mean
from kvc_compile.methods.capabilities import Lookahead
from kvc_compile.methods.snapkv import check_window_options
from kvc_compile.methods.wrapped import build_scorer


def stage1_defaults() -> dict[str, Any]:
    return {"window_size": 32, "kernel_size": 7, "pooling": "max"}


@dataclass(frozen=True)
class LAQ(Lookahead):
    name = "laq"
    paper = "arXiv 2505.20334"

    lookahead: int = 8
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"
    stage1: str = "snapkv"
    stage1_options: dict[str, Any] = field(default_factory=stage1_defaults)

    def __post_init__(self) -> None:
        if self.lookahead < 1:
            raise ValueError(f"{self.name}: lookahead must be at least 1 pseudo token, got {self.lookahead}")
        if self.window_size < 0:
            raise ValueError(f"{self.name}: window_size must be 0 (LAQ) or positive (LAQ++), got {self.window_size}")
        check_window_options(self.name, max(self.window_size, 1), self.kernel_size, self.pooling)
        object.__setattr__(self, "inner", build_scorer(self.name, self.stage1, self.stage1_options))

    @property
    def min_uncompressed_length(self) -> int:
        return max(self.inner.min_uncompressed_length, self.window_size)

    @property
    def lookahead_queries(self) -> int:
        """Queries each layer keeps for stage 2: the last ``window_size`` prompt ones, then the pseudo ones."""
        return self.window_size + self.lookahead

    def score(self, inputs: ScoreInputs) -> Tensor:
        return self.inner.score(inputs)

    def lookahead_scores(self, keys: Tensor, valid: Tensor, voters: Tensor, voter_valid: Tensor) -> Tensor:
        """Stage-2 scores [batch, kv_heads, n] of the prompt ``keys`` [batch, kv_heads, n, d].

        ``voters`` [batch, q_heads, v, d] are the buffered queries (prompt window, then pseudo
        tokens), ``voter_valid`` [batch, v] says which of them vote; ``valid`` [batch, n] marks real keys.
        """
        batch, q_heads, v, head_dim = voters.shape
        kv_heads, n, w = keys.shape[1], keys.shape[2], self.window_size
        grouped = voters.float().view(batch, kv_heads, q_heads // kv_heads, v, head_dim)
        logits = torch.einsum("bhgvd,bhnd->bhgvn", grouped, keys.float()) / math.sqrt(head_dim)
        weights = logits.masked_fill(~valid[:, None, None, None, :], float("-inf")).softmax(dim=-1)
        weights = weights.nan_to_num(0.0).masked_fill(~voter_valid[:, None, None, :, None], 0.0)
        votes = weights.sum(dim=3).reshape(batch, q_heads, n)[..., : n - w]
        pad = self.kernel_size // 2
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        scores = gqa_mean(pool(votes, self.kernel_size, stride=1, padding=pad), kv_heads)
        return F.pad(scores, (0, w), value=PROTECTED)


__all__ = ["LAQ"]
