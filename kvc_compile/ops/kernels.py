"""Ops with a Triton kernel on the GPU and the pure-PyTorch reference elsewhere.

Registered with ``torch.library.triton_op`` so Inductor and AOTInductor see the kernels inside and
embed them in compiled programs. On the CPU (and without Triton) each op runs its reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.methods.base import register_top_positions_kernel
from kvc_compile.methods.snapkv import window_votes as window_votes_reference
from kvc_compile.plugins.triton import TRITON_AVAILABLE


def use_kernels(tensor: Tensor) -> bool:
    """Whether ops on ``tensor`` run the Triton kernels: on CUDA, when Triton is installed."""
    return TRITON_AVAILABLE and tensor.is_cuda


@torch.library.triton_op("kvc::window_votes", mutates_args=())
def window_votes(queries: Tensor, keys: Tensor, valid: Tensor, window: int) -> Tensor:
    """Fused observation-window votes (``kvc_compile.plugins.triton.window_scores``)."""
    if not use_kernels(queries):
        return window_votes_reference(queries, keys, valid, window)
    from kvc_compile.plugins.triton.window_scores import window_votes_triton

    return window_votes_triton(queries, keys, valid, window)


@torch.library.triton_op("kvc::select_and_gather", mutates_args=())
def select_and_gather(scores: Tensor, keys: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best entries per row, gathered in position order (``kvc_compile.plugins.triton.compaction``).

    Ties go to the lowest positions on every device.
    """
    if not use_kernels(scores):
        from kvc_compile.methods.base import gather_kept
        from kvc_compile.plugins.triton.compaction import stable_select_reference

        kept = stable_select_reference(scores, k)
        return gather_kept(keys, kept), gather_kept(values, kept), kept.to(torch.int32)
    from kvc_compile.plugins.triton.compaction import select_and_gather_triton

    return select_and_gather_triton(scores, keys, values, k)


@torch.library.triton_op("kvc::output_saliency", mutates_args=())
def output_saliency(queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, window: int, variant: str) -> Tensor:
    """OBCache's fused saliency (``kvc_compile.plugins.triton.window_scores``)."""
    if not use_kernels(queries):
        from kvc_compile.methods.obcache import window_output_saliency

        return window_output_saliency(queries, keys, values, valid, window, variant)
    from kvc_compile.plugins.triton.window_scores import output_saliency_triton

    return output_saliency_triton(queries, keys, values, valid, window, variant)


@torch.library.triton_op("kvc::top_positions", mutates_args=())
def top_positions_op(scores: Tensor, k: int) -> Tensor:
    """The ``k`` best positions per row, ties to the lowest (``plugins.triton.compaction``)."""
    if not use_kernels(scores):
        from kvc_compile.plugins.triton.compaction import stable_select_reference

        return stable_select_reference(scores, k)
    from kvc_compile.plugins.triton.compaction import top_positions_triton

    return top_positions_triton(scores, k)


def _top_positions_on_gpu(scores: Tensor, k) -> Tensor | None:
    return top_positions_op(scores, int(k)) if use_kernels(scores) else None


# Every selection (uniform or head-adaptive) of GPU scores goes through the radix select.
register_top_positions_kernel(_top_positions_on_gpu)


def score_kernels(tensor: Tensor) -> dict:
    """``ScoreInputs`` fields that route scoring and selection to the kernels when ``tensor`` is on the GPU."""
    if not use_kernels(tensor):
        return {}
    return {"votes_kernel": window_votes, "select_kernel": select_and_gather, "saliency_kernel": output_saliency}


@torch.library.triton_op("kvc::rope_lowrank_project", mutates_args=())
def rope_lowrank_project(keys: Tensor, cos: Tensor, sin: Tensor, down: Tensor) -> Tensor:
    """RoPE and KQ-SVD's key projection in one pass (``kvc_compile.plugins.triton.lowrank``)."""
    from kvc_compile.plugins.triton import lowrank

    if not use_kernels(keys):
        return lowrank.rope_lowrank_project_reference(keys, cos, sin, down)
    return lowrank.rope_lowrank_project_triton(keys, cos, sin, down)


@torch.library.triton_op("kvc::lowrank_decode_attention", mutates_args=())
def lowrank_decode_attention(
    query: Tensor, key_up: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scaling: float
) -> Tensor:
    """One decoding step over a dense rank-R cache, queries projected inside (``plugins.triton.lowrank``)."""
    from kvc_compile.plugins.triton import lowrank

    if not use_kernels(query):
        return lowrank.lowrank_decode_attention_reference(query, key_up, keys, values, valid, scaling)
    return lowrank.lowrank_decode_attention_triton(query, key_up, keys, values, valid, scaling)
