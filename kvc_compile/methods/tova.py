"""TOVA: "Transformers are Multi-State RNNs" (Oren, Hassid, Yarden, Adi, Schwartz; EMNLP 2024,
arXiv 2401.06104).

Token Omission Via Attention: the current query is the best judge of what the model still needs, so
each key is scored by the attention the last prompt token pays to it, averaged over all query heads
of the layer. The same score goes to every KV head (one decision per layer, as in the paper), and the
last token itself is always kept.

Follows kvpress's ``TOVAPress``: one shot at the end of prefill (the paper evicts one token per
decode step), the attention softmax includes the last token's own key, and forcing that token to be
kept is a kvpress addition the paper does not make (it usually wins anyway, its self-attention
being high).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, Method, ScoreInputs


@dataclass(frozen=True)
class TOVA(Method):
    name = "tova"
    paper = "arXiv 2401.06104"
    queries_read = 1

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys = inputs.keys
        batch, kv_heads, n, _ = keys.shape
        # [batch, q_heads, 1, n]: the last query is a real token under left padding.
        last = inputs.window_votes(1)[..., : n - 1]
        scores = last.mean(dim=1, keepdim=True).expand(batch, kv_heads, n - 1)
        return F.pad(scores, (0, 1), value=PROTECTED)
