"""ChunkKV: "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference" (Liu et al., NeurIPS 2025, arXiv 2502.00299).

Keeps contiguous chunks instead of single tokens, so a kept fact keeps its neighbours. Any
scorer's token scores are summed over KV heads and averaged per chunk of ``chunk_length``
tokens (a trailing partial chunk is its own chunk); chunks are kept best first, and every head
keeps the same positions. Defaults follow kvpress's ``ChunkKVPress`` (SnapKV scorer, chunks of
20). Differences: kvpress keeps ``int(n_chunks * (1 - ratio))`` whole chunks, decided by the first
row of the batch; here each row keeps exactly the method's token budget (the last chunk taken may
be cut, keeping its first tokens), so the cache shape does not depend on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import ScoreInputs
from kvc_compile.methods.wrapped import ScorerWrapper


def chunk_order_scores(token_scores: Tensor, valid: Tensor, chunk_length: int) -> Tensor:
    """[batch, n] scores whose top-k is "whole chunks, best chunk first, first tokens first".

    A chunk's score is the mean of its real tokens' scores (PROTECTED tokens make it +inf).
    """
    batch, n = token_scores.shape
    n_chunks = -(-n // chunk_length)
    pad = n_chunks * chunk_length - n
    scores = F.pad(token_scores.masked_fill(~valid, 0.0), (0, pad)).view(batch, n_chunks, chunk_length)
    counts = F.pad(valid.float(), (0, pad)).view(batch, n_chunks, chunk_length).sum(-1)
    chunk_scores = scores.sum(-1) / counts.clamp(min=1)
    chunk_scores = chunk_scores.masked_fill(counts == 0, float("-inf"))
    rank = torch.empty_like(chunk_scores, dtype=torch.long)
    order = chunk_scores.argsort(dim=-1, descending=True, stable=True)
    rank.scatter_(-1, order, torch.arange(n_chunks, device=order.device).expand(batch, -1))
    position = torch.arange(n, device=token_scores.device)
    key = rank[:, position // chunk_length] * chunk_length + position % chunk_length
    return -key.float()


@dataclass(frozen=True)
class ChunkKV(ScorerWrapper):
    name = "chunkkv"
    paper = "arXiv 2502.00299"

    chunk_length: int = 20

    def __post_init__(self) -> None:
        if self.chunk_length <= 0:
            raise ValueError(f"chunkkv: chunk_length must be a positive integer, got {self.chunk_length}")
        super().__post_init__()

    def score(self, inputs: ScoreInputs) -> Tensor:
        token_scores = self.inner.score(inputs).float()
        # inf - inf would be NaN: sum finite parts, and let any protected token protect its chunk.
        protected = torch.isposinf(token_scores).any(dim=1)
        summed = token_scores.nan_to_num(posinf=0.0, neginf=0.0).sum(dim=1)
        summed = summed.masked_fill(protected, float("inf"))
        ordered = chunk_order_scores(summed, inputs.valid, self.chunk_length)
        return ordered[:, None, :].expand(-1, inputs.keys.shape[1], -1)
