"""KQ-SVD: "Compressing the KV Cache with Provable Guarantees on Attention Fidelity" (Lesens,
Rakhshan, Rabusseau; arXiv 2512.05916).

Rank compression, not eviction: every cached key is stored as ``k A`` (rank ``R`` instead of
``head_dim``) and each query is projected as ``q B``, so ``(q B)(k A)^T`` approximates
``q k^T``. For calibration keys ``K`` [T, d] and the queries of the KV head's GQA group stacked
``Q`` [m T, d], the ``A, B`` minimising ``||K A B^T Q^T - K Q^T||_F`` are (Theorem 2)
``A = K^+ U``, ``B = K^T U`` with ``U`` the top-``R`` left singular vectors of ``K Q^T``, which is
then approximated by its Eckart-Young best rank-``R`` matrix ``U U^T K Q^T``. ``K Q^T`` is never
formed: with thin QRs ``K = Q_K R_K``, ``Q = Q_Q R_Q`` and the SVD of the small ``R_K R_Q^T = U' S V'^T``,
``U = Q_K U'_R``, ``B = R_K^T U'_R`` and ``A = R_K^+ U'_R``.

Values get the same recipe on ``V W_O`` (Appendix B): the cache stores ``V A_v`` and the head's
output is lifted back by ``B_v^T`` (foldable into the output projection), giving ``U_v U_v^T V``.
For a KV head shared by several query heads the paper's code averages their ``W_O`` blocks; here
they are concatenated (``[V W_O^1, ..., V W_O^m]``), which is the same closed form with one
subspace that is best for all the heads' outputs together, and cannot cancel blocks of opposite
sign as an average can.

The two baselines of the paper behave the same way (``A = B``): ``ksvd`` takes the top right
singular vectors of ``K`` (best for ``K`` alone), ``eigen`` those of ``[K; Q]``; both project
values on the top right singular vectors of ``V``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

LOWRANK_METHODS = ("kqsvd", "ksvd", "eigen")


class LowRankFactors(NamedTuple):
    """``down`` [d, R] projects what is cached (``x @ down``), ``up`` [d, R] its partner: the query
    projection for keys (``(q @ up) . (k @ down) ~ q . k``), the lift back to ``head_dim`` for
    values (``(v @ down) @ up.T ~ v``). ``spectrum``: the singular values the rank was chosen from."""

    down: Tensor
    up: Tensor
    spectrum: Tensor


def _small_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``R_L``, and the SVD ``U', S`` of ``R_L R_R^T`` for ``left = Q_L R_L``, ``right = Q_R R_R``
    (the singular pairs of ``left @ right.T`` without forming it)."""
    r_left = torch.linalg.qr(left.double(), mode="r").R
    r_right = torch.linalg.qr(right.double(), mode="r").R
    u, s, _ = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return r_left, u, s


def kqsvd_factors(keys: Tensor, queries: Tensor, rank: int) -> LowRankFactors:
    """KQ-SVD key factors from ``keys`` [T, d] and ``queries`` [m T, d] (post-RoPE, fp64 inside)."""
    check_rank(rank, keys.shape[-1])
    r_keys, u, s = _small_svd(keys, queries)
    u = u[:, :rank]
    return LowRankFactors(torch.linalg.pinv(r_keys) @ u, r_keys.T @ u, s)


def ksvd_factors(keys: Tensor, queries: Tensor, rank: int) -> LowRankFactors:
    """K-SVD baseline: project keys and queries on the top right singular vectors of ``keys``."""
    check_rank(rank, keys.shape[-1])
    _, s, vh = torch.linalg.svd(keys.double(), full_matrices=False)
    basis = vh[:rank].T
    return LowRankFactors(basis, basis, s)


def eigen_factors(keys: Tensor, queries: Tensor, rank: int) -> LowRankFactors:
    """Eigen baseline: project both on the top right singular vectors of ``[keys; queries]``."""
    check_rank(rank, keys.shape[-1])
    _, s, vh = torch.linalg.svd(torch.cat([keys, queries]).double(), full_matrices=False)
    basis = vh[:rank].T
    return LowRankFactors(basis, basis, s)


KEY_FACTORS = {"kqsvd": kqsvd_factors, "ksvd": ksvd_factors, "eigen": eigen_factors}


def value_factors(values: Tensor, output_blocks: Tensor, rank: int) -> LowRankFactors:
    """Value factors from ``values`` [T, d] and the output-projection blocks of the query heads that
    read this KV head, ``output_blocks`` [m, d, D] (``W_O^h``: how head ``h``'s output enters the model)."""
    check_rank(rank, values.shape[-1])
    m, d, hidden = output_blocks.shape
    # [V W_O^1, ..., V W_O^m] = V @ W, W = [W_O^1, ..., W_O^m] of shape [d, m D]: its QR is V's times W.
    r_values = torch.linalg.qr(values.double(), mode="r").R
    u, s, _ = torch.linalg.svd(r_values @ output_blocks.double().permute(1, 0, 2).reshape(d, m * hidden),
                               full_matrices=False)
    u = u[:, :rank]
    return LowRankFactors(torch.linalg.pinv(r_values) @ u, r_values.T @ u, s)


def values_svd_factors(values: Tensor, output_blocks: Tensor, rank: int) -> LowRankFactors:
    """Baselines' values: the top right singular vectors of ``values`` alone (``output_blocks`` unused)."""
    return ksvd_factors(values, values, rank)


VALUE_FACTORS = {"kqsvd": value_factors, "ksvd": values_svd_factors, "eigen": values_svd_factors}


def check_rank(rank: int, head_dim: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= head_dim:
        raise ValueError(f"rank must be an integer in [1, head_dim={head_dim}], got {rank!r}")


def rank_for_error(spectra: Tensor, max_error: float) -> int:
    """Smallest rank whose discarded energy is at most ``max_error**2`` of the total, for the
    mean of ``spectra`` [heads, k] (one rank per layer, as the paper's code chooses it): the
    relative Frobenius error of the best rank-R approximation is then at most ``max_error``."""
    if not 0 <= max_error < 1:
        raise ValueError(f"max_error must be in [0, 1) (relative Frobenius error allowed), got {max_error}")
    energy = spectra.double().pow(2).mean(dim=0)
    kept = energy.cumsum(0) / energy.sum()
    return int((kept < 1 - max_error**2 - 1e-12).sum().item()) + 1


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact||_F^2 / ||exact||_F^2`` (the paper's projection-quality metric)."""
    return ((approx.double() - exact.double()).pow(2).sum() / exact.double().pow(2).sum()).item()
