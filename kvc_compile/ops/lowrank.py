"""Low-rank (KQ-SVD) cache ops.

``kvc::lowrank_project`` multiplies cached entries by their KV head's factor (``k -> k A`` right
after RoPE, ``v -> v A_v``): one op, so a kernel can replace it. ``kvc::lowrank_factors`` is what
a ``CompressedCache`` layer records at prefill for its factors: empty ones (no projection) unless
the kvc pass rewires them to ``kvc::calibrated_factors``, which is how the compiled prefill hands
them to the cache for decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.config import CompressionConfig
from kvc_compile.methods.kqsvd import project_entries

FACTOR_NAMES = ("key_down", "key_up", "value_down", "value_up")


@torch.library.custom_op("kvc::lowrank_project", mutates_args=())
def lowrank_project(x: Tensor, heads: Tensor | None, down: Tensor) -> Tensor:
    """[batch, A, T, d] entries -> [batch, A, T, R]; ``heads`` labels packed entries (None: dense)."""
    return project_entries(x, heads, down).contiguous()


@lowrank_project.register_fake
def _(x, heads, down):
    return x.new_empty(*x.shape[:-1], down.shape[-1])


@torch.library.custom_op("kvc::lowrank_factors", mutates_args=())
def lowrank_factors(key_states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """No projection: key down/up and value down/up factors of rank 0, [kv_heads, d, 0] each."""
    _, kv_heads, _, head_dim = key_states.shape
    return tuple(key_states.new_empty(kv_heads, head_dim, 0, dtype=torch.float32) for _ in range(4))


@lowrank_factors.register_fake
def _(key_states):
    _, kv_heads, _, head_dim = key_states.shape
    return tuple(key_states.new_empty(kv_heads, head_dim, 0, dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("kvc::calibrated_factors", mutates_args=())
def calibrated_factors(like: Tensor, spec: str, layer_idx: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Layer ``layer_idx``'s calibrated factors at the configured ranks, on ``like``'s device (fp32).

    An op rather than graph constants, so every backend sees them the same way; they are small
    (``kv_heads * head_dim * R`` each) and read once per prefill.
    """
    projections = CompressionConfig.from_spec(spec).projections
    return tuple(
        getattr(projections, name)[layer_idx].to(like.device, torch.float32, copy=True) for name in FACTOR_NAMES
    )


@calibrated_factors.register_fake
def _(like, spec: str, layer_idx: int):
    projections = CompressionConfig.from_spec(spec).projections
    return tuple(
        like.new_empty(getattr(projections, name)[layer_idx].shape, dtype=torch.float32) for name in FACTOR_NAMES
    )
