"""LagKV: "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"
(Liang, Wang, Yang, Gu; arXiv 2504.04704).

Query-free and attention-free. After ``n_sink`` sink tokens the prompt is cut into chunks of
``lag_size`` tokens, and each chunk is judged against the chunk that follows it (its lag): every
channel of a key is min-max normalised by that channel's range over the next chunk's keys, and the
token's key score is the standard deviation of its normalised channels, softmaxed over the chunk.
Values are scored the same way and the two scores averaged. Within a chunk, tokens are then ranked,
score = rank / ``lag_size``, so every chunk gives up about the same share. The sinks and the last
full chunk with the remainder after it (no lag to compare with) score 1 and are kept first; a prompt
shorter than ``n_sink + 2 * lag_size`` has no chunk to score, and keeps its sinks and newest tokens.

Defaults and structure as kvpress's ``LagKVPress`` (``n_sink=4, lag_size=128``, ranks within a
chunk; its experimental ``cross_scoring`` is left out). Chunks start at each row's first real
token, so a left-padded row scores its tokens as it would alone, and a channel whose range over the
lag chunk is zero divides by the smallest normal float instead of by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import Method, ScoreInputs, kv_heads_view, positions_from_first_valid, valid_first_order


@dataclass(frozen=True)
class LagKV(Method):
    name = "lagkv"
    paper = "arXiv 2504.04704"
    queries_read = 0

    n_sink: int = 4
    lag_size: int = 128

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError(f"lagkv: n_sink must be >= 0 (sink tokens always kept), got {self.n_sink}")
        if self.lag_size < 1:
            raise ValueError(f"lagkv: lag_size must be >= 1 (tokens per chunk), got {self.lag_size}")

    def score(self, inputs: ScoreInputs) -> Tensor:
        valid = inputs.valid
        batch, heads, n, dim = inputs.keys.shape
        sinks, lag = self.n_sink, self.lag_size
        real_index = positions_from_first_valid(valid)  # each token's index among its row's real tokens
        real = valid.sum(-1, keepdim=True)  # [batch, 1]
        # Sinks score 1; the rest ramps up with recency, which a row with chunks to score overrides.
        after_sinks = (real - sinks).clamp_min(1)
        ramp = ((real_index - sinks).clamp_min(0) / after_sinks).clamp_max(1)
        scores = torch.where(real_index < sinks, 1.0, ramp.float())
        full_chunks = (real - sinks).clamp_min(0) // lag  # [batch, 1]
        scores = torch.where((full_chunks >= 2) & (real_index >= sinks), 1.0, scores)
        scores = kv_heads_view(scores, heads).contiguous()
        chunks = max((n - sinks) // lag, 0)  # full chunks of the longest row
        if chunks < 2:
            return scores
        # Where each row's real tokens after its sinks sit, in order: [batch, chunks * lag].
        index = valid_first_order(valid)[:, sinks:sinks + chunks * lag]
        gather = index[:, None, :, None].expand(batch, heads, -1, dim)

        def chunked(states: Tensor) -> Tensor:
            return states.float().gather(2, gather).view(batch, heads, chunks, lag, dim)

        chunk_scores = (_lag_relative(chunked(inputs.keys)) + _lag_relative(chunked(inputs.values))) / 2
        ranks = chunk_scores.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).float() / lag
        # Chunk c is scored when its lag, c + 1, is a full chunk of the row other than its last.
        chunk_id = torch.arange(chunks - 1, device=valid.device)[None, :, None]
        scored = (chunk_id <= full_chunks[:, :, None] - 2).expand(batch, chunks - 1, lag)
        targets = index[:, :(chunks - 1) * lag][:, None, :].expand(batch, heads, -1)
        current = scores.gather(2, targets)
        updated = torch.where(scored.reshape(batch, 1, -1), ranks.reshape(batch, heads, -1), current)
        return scores.scatter(2, targets, updated)


def _lag_relative(chunks: Tensor) -> Tensor:
    """Scores of the tokens of every chunk but the last, each normalised by the next chunk's channel
    range: [batch, heads, chunks, lag, dim] -> [batch, heads, chunks - 1, lag], softmaxed per chunk."""
    reference, judged = chunks[:, :, 1:], chunks[:, :, :-1]
    low = reference.amin(dim=-2, keepdim=True)
    spread = (reference.amax(dim=-2, keepdim=True) - low).clamp_min(torch.finfo(chunks.dtype).tiny)
    return ((judged - low) / spread).std(dim=-1).softmax(dim=-1)
