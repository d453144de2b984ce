"""Ops with a Triton kernel on the GPU and the pure-PyTorch reference elsewhere.

Registered with ``torch.library.triton_op`` so Inductor and AOTInductor see the kernels inside and
embed them in compiled programs. On the CPU (and without Triton) each op runs its reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.compression.attention import packed_attention_reference
from kvc_compile.compression.layout import gather_kept
from kvc_compile.methods.kernels import REFERENCE, Kernels, using_kernels
from kvc_compile.methods.scoring import window_output_saliency
from kvc_compile.methods.scoring import window_votes as window_votes_reference
from kvc_compile.plugins.triton import TRITON_AVAILABLE
from kvc_compile.plugins.triton.compaction import stable_select_reference


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
        kept = stable_select_reference(scores, k)
        return gather_kept(keys, kept), gather_kept(values, kept), kept.to(torch.int32)
    from kvc_compile.plugins.triton.compaction import select_and_gather_triton

    return select_and_gather_triton(scores, keys, values, k)


@torch.library.triton_op("kvc::output_saliency", mutates_args=())
def output_saliency(queries: Tensor, keys: Tensor, values: Tensor, valid: Tensor, window: int, variant: str) -> Tensor:
    """OBCache's fused saliency (``kvc_compile.plugins.triton.window_scores``)."""
    if not use_kernels(queries):
        return window_output_saliency(queries, keys, values, valid, window, variant)
    from kvc_compile.plugins.triton.window_scores import output_saliency_triton

    return output_saliency_triton(queries, keys, values, valid, window, variant)


@torch.library.triton_op("kvc::top_positions", mutates_args=())
def top_positions_op(scores: Tensor, k: int) -> Tensor:
    """The ``k`` best positions per row, ties to the lowest (``plugins.triton.compaction``)."""
    if not use_kernels(scores):
        return stable_select_reference(scores, k)
    from kvc_compile.plugins.triton.compaction import top_positions_triton

    return top_positions_triton(scores, k)


GPU_KERNELS = Kernels(window_votes=window_votes, output_saliency=output_saliency,
                      select_and_gather=select_and_gather, top_positions=top_positions_op)


def device_kernels(tensor: Tensor):
    """A context in which scoring and selection run the kernels for ``tensor``'s device: the Triton
    ones on CUDA, the references elsewhere. Every op that scores or selects runs inside one."""
    return using_kernels(GPU_KERNELS if use_kernels(tensor) else REFERENCE)


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


@torch.library.triton_op("kvc::packed_attention", mutates_args=())
def packed_attention(
    query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, kv_heads: int, scaling: float
) -> Tensor:
    """``packed_attention_reference`` as an op, so compiled decode graphs show where the packed
    layout is read; on the GPU it runs the variable-length Triton kernel
    (``kvc_compile.plugins.triton.decode_attention``), elsewhere the reference."""
    if not use_kernels(query):
        return packed_attention_reference(query, keys, values, heads, kv_heads, scaling)
    from kvc_compile.plugins.triton.decode_attention import packed_attention_triton

    return packed_attention_triton(query, keys, values, heads, kv_heads, scaling)
