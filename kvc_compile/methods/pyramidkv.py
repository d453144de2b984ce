"""PyramidKV: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(Cai et al., arXiv 2406.02069).

SnapKV scores with per-layer budgets that shrink linearly from the bottom layer to the top one
(attention funnels onto fewer tokens in higher layers). With an average per-head budget ``B``
(window ``w`` included) and ``P = B - w``: the top layer keeps ``P // beta`` prefix tokens, the
bottom one ``2P - P // beta`` (clipped to the prompt), linearly in between, so the layers'
total equals ``L * B`` exactly (integer rounding is carried from layer to layer). Defaults follow
kvpress's ``PyramidKVPress`` (window 64, average pooling kernel 5, beta 20), whose budget
``B = w + n(1 - ratio)`` puts the window on top of the ratio; here the window is inside the
budget, as in SnapKV, so a ratio means the same number of cached tokens for every method.
Layers keep different counts, so the cache uses the packed layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvc_compile.methods.capabilities import PackedLayout
from kvc_compile.methods.selection import select_uniform
from kvc_compile.methods.snapkv import SnapKV


def pyramid_prefix_total(layers_before: int, top: int, bottom: int, n_layers: int):
    """Prefix tokens kept by the first ``layers_before`` layers (integer floor of the linear ramp)."""
    span = 2 * (n_layers - 1)
    ramp = span * layers_before * bottom - (bottom - top) * layers_before * (layers_before - 1)
    return ramp // span


@dataclass(frozen=True)
class PyramidKV(PackedLayout, SnapKV):
    name = "pyramidkv"
    paper = "arXiv 2406.02069"

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"pyramidkv: beta must be an integer >= 1 (top budget = average / beta), got {self.beta}")

    def layer_kept_length(self, n_kept, n, layer_idx: int, n_layers: int):
        prefix = n_kept - self.window_size
        if n_layers == 1 or prefix <= 0:
            return n_kept  # nothing to redistribute: uniform SnapKV
        bottom = torch.sym_min(2 * prefix - prefix // self.beta, n - self.window_size)
        top = 2 * prefix - bottom
        before = pyramid_prefix_total(layer_idx, top, bottom, n_layers)
        upto = pyramid_prefix_total(layer_idx + 1, top, bottom, n_layers)
        return self.window_size + upto - before

    def select(self, scores, valid, n_kept):
        kept = select_uniform(scores, valid, n_kept)
        heads = torch.arange(kept.shape[1], device=kept.device)[:, None]
        return (heads * scores.shape[-1] + kept).flatten(1)
