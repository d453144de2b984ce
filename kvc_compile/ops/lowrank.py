"""Low-rank (KQ-SVD) cache ops.

``kvc::lowrank_project`` multiplies cached entries by their KV head's factor (``k -> k A`` right
after RoPE, ``v -> v A_v``): one op, so a kernel can replace it. ``kvc::lowrank_lift`` takes
rank-R_v attention outputs back to head_dim; in compiled decode graphs the pass folds it into
``o_proj`` with the weight ``kvc::fold_output_projection`` computed at prefill. ``kvc::lowrank_factors`` is what
a ``CompressedCache`` layer records at prefill for its factors: empty ones (no projection) unless
the kvc pass rewires them to ``kvc::calibrated_factors``, which is how the compiled prefill hands
them to the cache for decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.compression.lowrank import FACTOR_NAMES, fold_heads, project_entries
from kvc_compile.config import CompressionConfig


@torch.library.custom_op("kvc::lowrank_project", mutates_args=())
def lowrank_project(x: Tensor, heads: Tensor | None, down: Tensor) -> Tensor:
    """[batch, A, T, d] entries -> [batch, A, T, R]; ``heads`` labels packed entries (None: dense)."""
    return project_entries(x, heads, down).contiguous()


@lowrank_project.register_fake
def _(x, heads, down):
    return x.new_empty(*x.shape[:-1], down.shape[-1])


def _no_factors(key_states: Tensor) -> tuple[Tensor, ...]:
    _, kv_heads, _, head_dim = key_states.shape
    factors = tuple(key_states.new_empty(kv_heads, head_dim, 0, dtype=torch.float32) for _ in range(4))
    return (*factors, key_states.new_empty(0, 0))


@torch.library.custom_op("kvc::lowrank_factors", mutates_args=())
def lowrank_factors(key_states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """No projection: key down/up and value down/up factors of rank 0 ([kv_heads, d, 0] each) and
    an empty folded output projection."""
    return _no_factors(key_states)


@lowrank_factors.register_fake
def _(key_states):
    return _no_factors(key_states)


@torch.library.custom_op("kvc::fold_output_projection", mutates_args=())
def fold_output_projection(output_weight: Tensor, value_up: Tensor) -> Tensor:
    """``B_v`` folded into ``o_proj`` (see ``fold_heads``); computed once per prefill, used by every decode step."""
    return fold_heads(output_weight, value_up)


@fold_output_projection.register_fake
def _(output_weight, value_up):
    q_heads = output_weight.shape[1] // value_up.shape[1]
    return output_weight.new_empty(output_weight.shape[0], q_heads * value_up.shape[2])


@torch.library.custom_op("kvc::lowrank_lift", mutates_args=())
def lowrank_lift(out: Tensor, value_up: Tensor, output_fold: Tensor) -> Tensor:
    """Rank-R_v attention outputs [batch, q, q_heads, R_v] lifted back to head_dim by their KV head's
    ``B_v^T``. ``output_fold`` (``fold_heads`` of o_proj, or empty) is not read here: it travels with
    the op so that the kvc pass can replace ``o_proj(lift(out))`` by ``out @ output_fold^T``."""
    return lowrank_lift_aten(out, value_up, output_fold)


def lowrank_lift_aten(out: Tensor, value_up: Tensor, output_fold: Tensor) -> Tensor:
    """``kvc::lowrank_lift`` in aten ops (ONNX export decomposes the op into it)."""
    batch, q_len, q_heads, rank = out.shape
    kv_heads = value_up.shape[0]
    grouped = out.reshape(batch, q_len, kv_heads, q_heads // kv_heads, rank)
    lifted = torch.einsum("bqkgr,kdr->bqkgd", grouped, value_up.to(out.dtype))
    return lifted.reshape(batch, q_len, q_heads, value_up.shape[1])


@lowrank_lift.register_fake
def _(out, value_up, output_fold):
    return out.new_empty(*out.shape[:-1], value_up.shape[1])


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
