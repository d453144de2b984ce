"""What a compression method is, and the selection every scorer shares.

A method only says how much each cached token is worth (``score``). The framework turns the
scores into a fixed number of kept tokens per KV head (``select_kept``), so every method gets
the same budget arithmetic, padding rules and static output shapes.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

# Scores of tokens that must be kept (observation window, sinks) and that must never be kept
# (padding). Infinite values keep them apart from every finite score a method can produce.
PROTECTED = float("inf")
EXCLUDED = float("-inf")


@dataclass(frozen=True)
class ScoreInputs:
    """Everything a scorer may read for one attention layer at the end of prefill.

    Shapes: ``queries`` [batch, q_heads, n, head_dim] (post-RoPE), ``keys``/``values``
    [batch, kv_heads, n, head_dim] (post-RoPE keys, as cached), ``valid`` [batch, n] bool
    (False at padding positions).
    """

    queries: Tensor
    keys: Tensor
    values: Tensor
    valid: Tensor
    layer_idx: int


@dataclass(frozen=True)
class Method(ABC):
    """A scorer: one dataclass per method, its fields are its options."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> Tensor:
        """Return [batch, kv_heads, n] scores, higher means keep."""

    @property
    def min_uncompressed_length(self) -> int:
        """Prompts this long or shorter are left uncompressed (e.g. shorter than the window)."""
        return 0

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def gqa_mean(per_query_head: Tensor, kv_heads: int) -> Tensor:
    """Average [batch, q_heads, n] scores over each GQA group -> [batch, kv_heads, n]."""
    batch, q_heads, n = per_query_head.shape
    return per_query_head.view(batch, kv_heads, q_heads // kv_heads, n).mean(dim=2)


def select_kept(scores: Tensor, valid: Tensor, n_kept: int) -> Tensor:
    """Indices of the ``n_kept`` best tokens per KV head, in ascending position order.

    Padding never outranks a real token. Ascending order matters: with left padding, any padding
    slot a short row is forced to keep lands first, which is where the logical attention mask
    (offset by the number of evicted tokens) masks it out.
    """
    scores = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
    kept = scores.topk(n_kept, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values


def gather_kept(tensor: Tensor, kept: Tensor) -> Tensor:
    """Gather [batch, kv_heads, n, d] along the token axis with [batch, kv_heads, k] indices."""
    return tensor.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def positions_from_first_valid(valid: Tensor) -> Tensor:
    """Position of each token counted from the row's first real token ([batch, n], padding < 0)."""
    return valid.long().cumsum(dim=-1) - 1


def kv_heads_view(x: Tensor, kv_heads: int) -> Tensor:
    """Broadcast a [batch, n] tensor to [batch, kv_heads, n]."""
    return x[:, None, :].expand(-1, kv_heads, -1)


def keep_everything(batch: int, kv_heads: int, n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).expand(batch, kv_heads, n)


def compress_layer(
    method: Method, n_kept: int, queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, layer_idx: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Score, select and gather one layer: returns kept keys, kept values and kept indices.

    The outputs are fresh tensors (never views of the inputs), as a custom op's outputs must be.
    """
    batch, kv_heads, n, _ = keys.shape
    if n_kept >= n:
        kept = keep_everything(batch, kv_heads, n, keys.device)
        return keys.clone(), values.clone(), kept.clone()
    scores = method.score(ScoreInputs(queries, keys, values, valid, layer_idx))
    kept = select_kept(scores, valid, n_kept)
    return gather_kept(keys, kept), gather_kept(values, kept), kept
