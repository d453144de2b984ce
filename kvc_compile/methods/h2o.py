"""H2O: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (Zhang,
Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen; NeurIPS 2023, arXiv 2306.14048).

A few "heavy hitter" tokens draw most of the attention, so the attention a key has accumulated is a
good guess of the attention it will draw later. The score is the attention every prompt query pays
to key ``j``, divided by the number of queries that can see it:
``s_j = (1 / |{i >= j}|) * sum_{i >= j} A_ij``. Without the division, early keys would win only
because more queries can attend to them.

Semantics follow kvpress's ``ObservedAttentionPress`` (one shot at the end of prefill, no recent
window, mean over the GQA group), not the paper's decode-time greedy eviction with a recent window.
kvpress reads the model's eager attention matrix; here it is recomputed from the post-RoPE queries
and keys in chunks of ``QUERY_CHUNK`` queries, so extra memory is ``O(QUERY_CHUNK * n)`` per head
and any attention implementation works. Under left padding only real queries vote and count in the
normaliser (kvpress counts every row).

While decoding (``decoding_interval``/``target_size``) the queries of evicted tokens are gone, so the
votes come from the ``decoding_window`` most recent tokens, as kvpress's ``DecodingPress`` scores any
scorer from a buffer of recent tokens: key ``j`` scores the attention those queries paid it, divided
by how many of them can see it (the whole window for every key older than the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import Method, ScoreInputs, check_decoding_window, gqa_mean
from kvc_compile.methods.scoring import window_attention, window_logits

# Queries per attention chunk: bounds the [batch, q_heads, chunk, n] fp32 slice held at once.
QUERY_CHUNK = 128


def accumulated_attention(queries: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
    """Column sums ``sum_i A_ij`` of the causal attention of every real query, [batch, q_heads, n] fp32."""
    batch, q_heads, n, _ = queries.shape
    totals = torch.zeros(batch, q_heads, n, dtype=torch.float32, device=keys.device)
    for start in range(0, n, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, n)
        # Queries start..stop-1 are the last rows of the prompt cut at ``stop``: exactly the window
        # attention of that shorter prompt (keys after ``stop`` are invisible to them anyway).
        weights = window_attention(queries[:, :, :stop], keys[:, :, :stop], valid[:, :stop], stop - start)
        # A padding query that sees only padding has a 0/0 softmax row: it casts no vote.
        totals[..., :stop] += weights.sum(dim=2)
    return totals


@dataclass(frozen=True)
class H2O(Method):
    name = "h2o"
    paper = "arXiv 2306.14048"

    decoding_window: int = 256

    def __post_init__(self) -> None:
        check_decoding_window(self.name, self.decoding_window)

    @property
    def decoding_queries(self) -> int:
        return self.decoding_window

    def score(self, inputs: ScoreInputs) -> Tensor:
        if inputs.query_valid is not None:
            return self.recent_votes(inputs)
        valid = inputs.valid
        totals = accumulated_attention(inputs.queries, inputs.keys, valid)
        # Real queries at positions >= j (reverse cumulative count); n - j when there is no padding.
        seen_by = valid.flip(-1).float().cumsum(-1).flip(-1).clamp(min=1)
        return gqa_mean(totals / seen_by[:, None, :], inputs.keys.shape[1])

    def recent_votes(self, inputs: ScoreInputs) -> Tensor:
        """The score while decoding, from the buffered queries of the newest ``decoding_window`` tokens.

        After evictions an entry no longer sits at its position's index, so which queries see which
        entries comes from the entries' logical positions: the step's token is the newest entry, and
        the buffer holds the queries of the positions just before it.
        """
        queries, keys, valid, positions = inputs.queries, inputs.keys, inputs.valid, inputs.positions
        if positions is None:
            raise ValueError(f"{self.name} scores while decoding from the entries' positions; none were given")
        batch, q_heads, n, _ = queries.shape
        kv_heads = keys.shape[1]
        window = min(self.decoding_window, n)
        steps_back = torch.arange(window - 1, -1, -1, device=keys.device)
        query_positions = positions.amax(dim=-1, keepdim=True) - steps_back  # [batch, kv_heads, window]
        sees = positions[:, :, None, :] <= query_positions[..., None]  # [batch, kv_heads, window, n]
        voters = inputs.query_valid[:, n - window:]
        sees = sees & valid[:, None, None, :] & voters[:, None, :, None]
        # Grouped by KV head, so the mask broadcasts over each group's query heads.
        logits = window_logits(queries, keys, window).view(batch, kv_heads, q_heads // kv_heads, window, n)
        # A buffer row that sees nothing (or holds no query) has a 0/0 softmax row: it casts no vote.
        weights = logits.masked_fill(~sees[:, :, None], float("-inf")).softmax(dim=-1).nan_to_num(nan=0.0)
        seen_by = sees.sum(dim=2).clamp(min=1)
        return weights.sum(dim=3).mean(dim=2) / seen_by
