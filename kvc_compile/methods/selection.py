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


def score_ranks(scores: Tensor) -> Tensor:
    """Rank of each score along the last axis (0: the best), ties to the lowest position as in
    ``top_positions``."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def two_stage_scores(first: Tensor, second: Tensor, budgets, first_share: float) -> Tensor:
    """Scores whose top ``budgets`` per head are a two-stage selection: a head's best
    ``floor(budget * first_share)`` entries by ``first``, then its best by ``second`` among the rest.

    ``first``/``second`` [batch, kv_heads, n] fp32 with padding at ``EXCLUDED`` in both; ``budgets``
    an int (every head) or [batch, kv_heads]. First-stage entries rank above every finite score and
    below ``PROTECTED`` ones (windows, sinks), as AdaKV's safeguard floor does.
    """
    if isinstance(budgets, Tensor):
        first_count = (budgets * first_share).floor()[..., None]
    else:
        first_count = int(budgets * first_share)
    chosen = score_ranks(first) < first_count
    forced = torch.full_like(second, torch.finfo(torch.float32).max)
    return torch.where(chosen & torch.isfinite(second), forced, second)


def _excluding_padding(valid: Tensor, *scores: Tensor) -> tuple[Tensor, ...]:
    """Each [batch, kv_heads, n] score tensor in fp32 with padding positions at ``EXCLUDED``."""
    return tuple(x.float().masked_fill(~valid[:, None, :], EXCLUDED) for x in scores)


def select_two_stage(first: Tensor, second: Tensor, valid: Tensor, n_kept, first_share: float) -> Tensor:
    """``select_uniform`` over ``two_stage_scores``: [batch, kv_heads, n_kept] positions, ascending."""
    first, second = _excluding_padding(valid, first, second)
    return top_positions(two_stage_scores(first, second, n_kept, first_share), n_kept)


def head_budgets(flat_kept: Tensor, kv_heads: int, n) -> Tensor:
    """[batch, kv_heads] entries each head holds among ``flat_kept`` ``head * n + position`` indices."""
    counts = torch.zeros(flat_kept.shape[0], kv_heads, dtype=torch.long, device=flat_kept.device)
    return counts.scatter_add_(1, flat_kept.div(n, rounding_mode="floor"), torch.ones_like(flat_kept))


def select_two_stage_head_adaptive(first: Tensor, second: Tensor, valid: Tensor, n_kept, alpha_safeguard: float,
                                   first_share: float) -> Tensor:
    """AdaKV's head budgets from ``first`` (``select_head_adaptive``), then each head's budget filled in
    two stages (``two_stage_scores``). Returns [batch, kv_heads * n_kept] flat indices, ascending."""
    batch, kv_heads, n = first.shape
    budgets = head_budgets(select_head_adaptive(first, valid, n_kept, alpha_safeguard), kv_heads, n)
    first, second = _excluding_padding(valid, first, second)
    kept = score_ranks(two_stage_scores(first, second, budgets, first_share)) < budgets[..., None]
    # The heads' budgets sum to kv_heads * n_kept, so exactly that many entries are marked kept.
    return top_positions(kept.float().reshape(batch, kv_heads * n), kv_heads * n_kept)


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
