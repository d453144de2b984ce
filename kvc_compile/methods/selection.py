"""From scores to kept tokens: the selection every scorer shares.

A method says how much each cached token is worth; these turn the scores into kept positions, so
every method gets the same budget arithmetic, padding rules and static output shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.methods.kernels import active_kernels

# Scores of tokens that must be kept (observation window, sinks) and that must never be kept
# (padding). Infinite values keep them apart from every finite score a method can produce.
PROTECTED = float("inf")
EXCLUDED = float("-inf")


def top_positions(scores: Tensor, k) -> Tensor:
    """Positions of the ``k`` best scores along the last axis, ascending; ties go to the lowest
    positions (max pooling makes plateaus of equal scores), so every device keeps the same entries
    (the Triton radix select an op hands in for GPU tensors follows the same rule)."""
    kernel = active_kernels().top_positions
    if kernel is not None:
        return kernel(scores, int(k))
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def select_uniform(scores: Tensor, valid: Tensor, n_kept) -> Tensor:
    """Indices of the ``n_kept`` best tokens per KV head, in ascending position order.

    Padding never outranks a real token. Ascending order matters: with left padding, any padding
    slot a short row is forced to keep lands first, which is where the logical attention mask
    (offset by the number of evicted tokens) masks it out.
    """
    scores = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
    return top_positions(scores, n_kept)


def select_head_adaptive(scores: Tensor, valid: Tensor, n_kept, alpha_safeguard: float) -> Tensor:
    """AdaKV selection: ``kv_heads * n_kept`` entries per row, shared out between heads by score.

    Each head first keeps its own top ``int(n_kept * alpha_safeguard)`` tokens (the safeguard
    floor), then the best remaining (head, token) pairs of the whole layer fill the budget, so
    heads whose attention is concentrated give slots to heads whose attention is spread.
    Returns [batch, kv_heads * n_kept] flat indices ``head * n + position``, ascending.
    """
    batch, kv_heads, n = scores.shape
    scores = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
    floor = int(n_kept * alpha_safeguard)
    if floor > 0:
        own_best = scores.topk(floor, dim=-1).indices
        # Above every finite score but below PROTECTED ties, so the floor never displaces a window.
        boosted = scores.scatter(-1, own_best, torch.finfo(torch.float32).max)
        scores = torch.where(torch.isinf(scores), scores, boosted)
    return top_positions(scores.reshape(batch, kv_heads * n), kv_heads * n_kept)
