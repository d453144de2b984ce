"""CurDKV: "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition" (Sengupta,
Chaudhary, Chakraborty; NeurIPS 2025, arXiv 2509.15038).

The attention output is ``softmax(QK^T) V``, so evicting a token costs roughly what its key *and*
its value contribute. CurDKV scores each cached token like a CUR row selection would, by an
"approximate leverage": the squared row norm of the key and of the value (``||k_j||^2``,
``||v_j||^2``), optionally after a Gaussian sketch ``G`` (``d x r``, entries ``N(0, 1/r)``, which
keeps squared norms in expectation). Each norm is divided by the sum over its block of
``local_window_size`` consecutive tokens, so every block gets a comparable share of the budget
instead of a few large-norm regions taking it all; the key and value terms are then combined
(``leverage_type``: product, average, key only or value only), normalised to sum 1 over the row,
and the first ``num_sinks`` tokens (attention sinks) are always kept. No queries and no attention
matrix are needed. Scores are per KV head (GQA-compatible by construction).

Defaults follow kvpress's ``CURPress`` and the authors' press (they agree): ``num_sinks=4``,
``leverage_type="kv_product"``, no sketch (rank 20 when enabled), blocks of 16. Differences:

* Block alignment follows kvpress: blocks start at the first token (positions 0..15, 16..31, ...,
  the last block may be short); the authors' code aligns blocks to the end of the sequence.
  Positions are counted from each row's first real token, so left padding does not shift the
  blocks or the sinks, and padding never enters a block sum.
* Everything is computed in fp32 (as the authors do; kvpress sketches in the model dtype).
* The sketch is drawn from a CPU generator seeded with ``seed + layer_idx`` and shared by the
  keys and values of every head of the layer (the reference code draws a fresh one per call), so
  runs are reproducible on every device.

``AdaCurDKV`` (``kvc_compile.methods.adacurdkv``) shares these scores between heads AdaKV-style.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, Method, ScoreInputs, positions_from_first_valid

LEVERAGE_TYPES = ("kv_product", "kv_avg", "key", "value")


def gaussian_sketch(rows: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """A [rows, rank] matrix with i.i.d. ``N(0, 1/rank)`` entries, drawn on the CPU from ``seed``.

    The ``1/rank`` variance makes ``E ||x^T G||^2 = ||x||^2``.
    """
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, rank, generator=generator) / math.sqrt(rank)).to(device)


def block_normalise(values: Tensor, valid: Tensor, block_size: int) -> Tensor:
    """Divide each entry of ``values`` [batch, heads, n] by the sum over its block of ``block_size``
    real tokens (blocks counted from each row's first real token; padding is excluded from the sums
    and comes out as 0). A block summing to 0 gives 0 instead of NaN."""
    batch, heads, n = values.shape
    values = values.masked_fill(~valid[:, None, :], 0.0)
    position = positions_from_first_valid(valid).clamp_min(0)  # padding lands in block 0 with weight 0
    block = (position // block_size)[:, None, :].expand(batch, heads, n)
    n_blocks = (n + block_size - 1) // block_size
    sums = values.new_zeros(batch, heads, n_blocks).scatter_add_(-1, block, values)
    return values / sums.gather(-1, block).clamp_min(torch.finfo(values.dtype).tiny)


@dataclass(frozen=True)
class CurDKV(Method):
    name = "curdkv"
    paper = "arXiv 2509.15038"
    queries_read = 0

    num_sinks: int = 4
    leverage_type: str = "kv_product"
    use_random_leverage: bool = False
    sketch_rank: int = 20
    use_local_approximation: bool = True
    local_window_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"{self.name}: num_sinks must be an integer >= 0, got {self.num_sinks}")
        if self.leverage_type not in LEVERAGE_TYPES:
            raise ValueError(
                f"{self.name}: unknown leverage_type {self.leverage_type!r}; valid choices: {', '.join(LEVERAGE_TYPES)}"
            )
        if self.sketch_rank <= 0:
            raise ValueError(f"{self.name}: sketch_rank must be a positive integer, got {self.sketch_rank}")
        if self.local_window_size <= 0:
            raise ValueError(f"{self.name}: local_window_size must be a positive integer, got {self.local_window_size}")

    def leverage(self, inputs: ScoreInputs) -> tuple[Tensor, Tensor]:
        """Key and value approximate leverages [batch, kv_heads, n] (block-normalised if enabled)."""
        keys, values, valid = inputs.keys.float(), inputs.values.float(), inputs.valid
        if self.use_random_leverage:
            sketch = gaussian_sketch(keys.shape[-1], self.sketch_rank, self.seed + inputs.layer_idx, keys.device)
            keys, values = keys @ sketch, values @ sketch
        key_lev = keys.square().sum(dim=-1).masked_fill(~valid[:, None, :], 0.0)
        value_lev = values.square().sum(dim=-1).masked_fill(~valid[:, None, :], 0.0)
        if self.use_local_approximation:
            key_lev = block_normalise(key_lev, valid, self.local_window_size)
            value_lev = block_normalise(value_lev, valid, self.local_window_size)
        return key_lev, value_lev

    def score(self, inputs: ScoreInputs) -> Tensor:
        key_lev, value_lev = self.leverage(inputs)
        if self.leverage_type == "kv_product":
            scores = key_lev * value_lev
        elif self.leverage_type == "kv_avg":
            scores = (key_lev + value_lev) / 2
        elif self.leverage_type == "key":
            scores = key_lev
        else:
            scores = value_lev
        # A distribution over the row's tokens (padding is already 0); guard an all-zero row.
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        position = positions_from_first_valid(inputs.valid)
        sinks = inputs.valid & (position < self.num_sinks)
        return scores.masked_fill(sinks[:, None, :], PROTECTED)
