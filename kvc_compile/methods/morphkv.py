"""MorphKV: "Dialogue Without Limits: Constant-Sized KV Caches for Extended Responses in LLMs"
(Ghadia, Kumar, Jain, Nair, Das; ICML 2025, arXiv 2503.00979).

A constant-size cache for long generations. At every decoding step the queries of the most recent
tokens judge the older ones: each older entry ("candidate") scores the attention the last
``window_size - 1`` queries pay to it, with the softmax taken over the candidates only, fused over
those queries by ``max`` or ``sum`` after a max over each GQA group. The best candidates and the
newest ``window_size + 1`` tokens stay; the cache holds ``budget`` entries per KV head (the paper's
``C + 1``, with ``C = budget - 1`` its ``max_capacity``), so each step evicts exactly one.

The pass compresses the prompt with the same rule at the end of prefill (the official code does it
at the first decoding step; the rule and its inputs are the same), then inserts the same scoring
into every decode graph, after that step's attention (``kvc_compile.passes.decode_compression``).
Decode graphs read a cache of constant shape, so one compiled step serves every token.

Defaults follow the paper's LongBench setting (``window_size=32``, ``sum`` fusion; ``C=2000``
there). Differences from the official code: the official step masks its own attention to each
query head's selection before evicting; here the step attends over the cache plus its own token,
then evicts by the group's selection, which is what every later step sees in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, ScoreInputs
from kvc_compile.methods.capabilities import CompressesWhileDecoding

FUSIONS = ("sum", "max")


def morph_scores(queries: Tensor, candidates: Tensor, valid: Tensor, query_valid: Tensor, fusion: str) -> Tensor:
    """Scores [batch, kv_heads, c] of ``candidates`` [batch, kv_heads, c, d] by ``queries`` [batch, q_heads, w, d].

    ``P_ij = softmax_j(q_i . k_j / sqrt(d))`` over the real candidates only (``valid`` [batch, c]),
    maxed over each GQA group, then fused over the real queries (``query_valid`` [batch, w]) by
    ``max`` or ``sum``. fp32.
    """
    batch, q_heads, w, head_dim = queries.shape
    kv_heads = candidates.shape[1]
    grouped = queries.float().view(batch, kv_heads, q_heads // kv_heads, w, head_dim)
    logits = torch.einsum("bhgwd,bhcd->bhgwc", grouped, candidates.float()) / math.sqrt(head_dim)
    weights = logits.masked_fill(~valid[:, None, None, None, :], float("-inf")).softmax(dim=-1)
    weights = weights.nan_to_num(0.0).masked_fill(~query_valid[:, None, None, :, None], 0.0)
    per_group = weights.amax(dim=2)  # [batch, kv_heads, w, c]
    return per_group.amax(dim=2) if fusion == "max" else per_group.sum(dim=2)


@dataclass(frozen=True)
class MorphKV(CompressesWhileDecoding):
    """Compresses every decode step too, back to ``budget`` entries."""

    name = "morphkv"
    paper = "arXiv 2503.00979"

    window_size: int = 32
    fusion: str = "sum"

    def __post_init__(self) -> None:
        if self.window_size < 2:
            raise ValueError(
                f"{self.name}: window_size must be at least 2 (the window's queries other than the newest vote), "
                f"got {self.window_size}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(f"{self.name}: unknown fusion {self.fusion!r}; valid choices: {', '.join(FUSIONS)}")

    @property
    def min_uncompressed_length(self) -> int:
        return self.window_size + 1

    @property
    def queries_read(self) -> int:
        return self.window_size

    def score(self, inputs: ScoreInputs) -> Tensor:
        """Candidates are all but the newest ``window_size + 1`` tokens, voted on by the queries of
        the ``window_size - 1`` tokens before the newest; the newest ``window_size + 1`` are kept."""
        keys, valid, w = inputs.keys, inputs.valid, self.window_size
        n = keys.shape[2]
        voters = inputs.queries[:, :, n - w : n - 1]
        candidates = n - w - 1
        scores = morph_scores(
            voters, keys[:, :, :candidates], valid[:, :candidates], valid[:, n - w : n - 1], self.fusion
        )
        return F.pad(scores, (0, w + 1), value=PROTECTED)


__all__ = ["MorphKV", "morph_scores"]

