"""KeyDiff: "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (Park, Jones, Morse, Goel, Lee, Lott; arXiv 2504.15364).

Keys that point where most keys point add little; distinct keys are kept. Per KV head, the anchor
is the mean of the unit-normalised cached (post-RoPE) keys, and a key's score is minus its cosine
similarity to the anchor, so the most dissimilar keys survive. It reads no query and no attention
weight, so it works with any attention kernel.

Defaults and structure as kvpress's ``KeyDiffPress`` (one anchor per head over the whole prompt),
with one difference: the anchor averages only a row's real tokens, so left padding in a batch does
not move it (kvpress runs one unpadded prompt at a time). The paper's block-wise form, which
evicts as the prompt is read in blocks, is chunked prefill's to add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import Method, ScoreInputs


@dataclass(frozen=True)
class KeyDiff(Method):
    name = "keydiff"
    paper = "arXiv 2504.15364"
    queries_read = 0

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys = inputs.keys.float()
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(keys.dtype).tiny)
        weights = inputs.valid[:, None, :, None].to(unit.dtype)  # [batch, 1, n, 1]: padding counts for nothing
        anchor = (unit * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True).clamp_min(1)
        anchor = anchor / anchor.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(keys.dtype).tiny)
        return -(unit * anchor).sum(dim=-1)
