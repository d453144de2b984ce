"""Random eviction: the baseline every method must beat.

Scores are uniform noise drawn from a CPU generator seeded with ``seed + layer_idx``, so a run is
reproducible and identical on every device and in every execution path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import Method, ScoreInputs


@dataclass(frozen=True)
class Random(Method):
    name = "random"
    paper = "baseline"
    queries_read = 0

    seed: int = 0

    def score(self, inputs: ScoreInputs) -> Tensor:
        batch, kv_heads, n, _ = inputs.keys.shape
        generator = torch.Generator().manual_seed(self.seed + inputs.layer_idx)
        return torch.rand(batch, kv_heads, n, generator=generator).to(inputs.keys.device)
