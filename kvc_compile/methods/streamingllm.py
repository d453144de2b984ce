"""StreamingLLM: "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., ICLR 2024,
arXiv 2309.17453).

Keep the first ``n_sink`` tokens (attention sinks) and the most recent tokens. As in kvpress's
``StreamingLLMPress``, positions are not re-assigned after eviction. Sinks are counted from each
row's first real token, so left padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvc_compile.methods.base import PROTECTED, Method, ScoreInputs, kv_heads_view, positions_from_first_valid


@dataclass(frozen=True)
class StreamingLLM(Method):
    name = "streamingllm"
    paper = "arXiv 2309.17453"
    queries_read = 0

    n_sink: int = 4

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError(f"streamingllm: n_sink must be >= 0, got {self.n_sink}")

    def score(self, inputs: ScoreInputs) -> Tensor:
        position = positions_from_first_valid(inputs.valid)
        # Recency is the score; sinks outrank everything.
        recency = position.float().masked_fill(position < self.n_sink, PROTECTED)
        return kv_heads_view(recency, inputs.keys.shape[1])
