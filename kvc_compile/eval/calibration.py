"""Context-calibrated compression, after Compactor (Chari, Van Durme; arXiv 2507.08143).

How much of a context can be evicted depends on the context: repetitive, predictable text
survives heavy compression, dense text does not. Compactor predicts the tolerable compression
*before* any query arrives, from one number the prefill already computes: the context's own
token-averaged negative log-likelihood ``NLL(c)`` (its surprise to the model).

Quality model. With ``r`` the retained fraction of the cache, the quality proxy is the ratio
``y(r) = NLL(t | full cache) / NLL(t | cache compressed to r)`` of a continuation ``t`` (1 when
compression costs nothing, towards 0 as it hurts). It is modelled as

    b(c) = alpha * NLL(c) + beta,     f(r, c) = (exp(b (r - 1)) - exp(-b)) / (1 - exp(-b)),

so ``f(0) = 0``, ``f(1) = 1``, and a larger ``b`` (a harder context, when ``alpha > 0``) makes the
quality fall off sooner as ``r`` shrinks; as ``b -> 0`` the curve becomes ``f = r``. Solving
``f = tau`` for a user quality target ``tau`` gives the retention to use:

    r*(c, tau) = 1 + ln(tau + (1 - tau) exp(-b)) / b.

Workflow:

1. For a few texts and retentions, ``measure_quality`` runs the reference compression and returns
   rows ``(r, NLL(context), y)``.
2. ``fit_calibration`` fits ``alpha, beta`` (one pair per eviction method) by least squares, with
   errors that over-predict quality (which would make ``r*`` too small and the answer worse)
   weighted ``under_weight`` times more than errors that waste memory.
3. At inference, ``context_nll`` of the prefill logits gives ``NLL(c)``, and
   ``ContextCalibration.compression_ratio(nll, tau)`` the ratio to compress that context with
   (kvpress convention: fraction removed). ``save``/``load`` keep a fitted calibration as JSON.

The paper fits on RULER and applies the fit to LongBench, with ``tau = 0.95`` (Llama) or 0.90
(Qwen). Neither compactor-vllm nor kvpress ships this step; the closed form of ``r*`` is derived
from the model above, and the fitting procedure (weighted least squares with L-BFGS, ``b`` kept
positive by a clamp) is ours.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.config import CompressionConfig
from kvc_compile.reference import attention_implementation, reference_prefill
from kvc_compile.transformers_compat import output_cache, with_cache

FORMAT = "kvc-context-calibration"
FORMAT_VERSION = 1
# b is kept at least this large: the model needs b > 0, and b -> 0 is the linear curve f = r anyway.
MIN_B = 1e-6
# Retentions are clamped to [MIN_RETENTION, 1], so 1 - r is always a valid compression_ratio (< 1).
MIN_RETENTION = 1e-6

Number = float | Tensor


def context_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Token-averaged next-token NLL of each row, [batch] fp32.

    ``logits`` [batch, n, vocab] are the model's outputs on ``input_ids`` [batch, n]; position ``i``
    predicts token ``i + 1``. With an ``attention_mask`` (1 real, 0 padding), a prediction counts
    only when both its input and its target are real tokens. A row with no prediction gives NaN.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [batch, n, vocab] for input_ids {tuple(input_ids.shape)}"
        )
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    if attention_mask is None:
        counted = torch.ones_like(targets, dtype=torch.bool)
    else:
        real = attention_mask.bool()
        counted = real[:, 1:] & real[:, :-1]
    return (nll * counted).sum(dim=-1) / counted.sum(dim=-1)


def _same_kind(result: Tensor, *inputs: Any) -> Number:
    """Python floats in, a Python float out (what ``CompressionConfig`` wants); tensors stay tensors."""
    if any(isinstance(x, Tensor) for x in inputs):
        return result
    return float(result)


@dataclass(frozen=True)
class ContextCalibration:
    """A fitted quality model ``b = alpha * NLL(context) + beta`` (see the module docstring).

    Methods take the context NLL as a float or a tensor (e.g. ``context_nll``'s [batch] output)
    and return the same kind; computations run in float64.
    """

    alpha: float
    beta: float

    def b(self, nll: Number) -> Number:
        """Steepness of the quality curve for a context of token-averaged NLL ``nll`` (>= ``MIN_B``)."""
        result = (self.alpha * torch.as_tensor(nll, dtype=torch.float64) + self.beta).clamp_min(MIN_B)
        return _same_kind(result, nll)

    def quality(self, r: Number, nll: Number) -> Number:
        """Predicted quality ``f(r) = (exp(b (r-1)) - exp(-b)) / (1 - exp(-b))`` at retention ``r``."""
        b = torch.as_tensor(self.b(nll), dtype=torch.float64)
        ratio = torch.as_tensor(r, dtype=torch.float64)
        # The same expression as expm1(b r) / expm1(b), written so that neither small nor large b loses digits.
        result = torch.exp(-b) * torch.expm1(b * ratio) / -torch.expm1(-b)
        return _same_kind(result, r, nll)

    def retention(self, nll: Number, tau: float) -> Number:
        """Smallest retained fraction whose predicted quality is ``tau``, clamped to [``MIN_RETENTION``, 1]."""
        _check_tau(tau)
        b = torch.as_tensor(self.b(nll), dtype=torch.float64)
        # ln(tau + (1 - tau) e^{-b}) = log1p((1 - tau) * expm1(-b)), accurate for small b.
        result = 1 + torch.log1p((1 - tau) * torch.expm1(-b)) / b
        return _same_kind(result.clamp(min=MIN_RETENTION, max=1.0), nll)

    def compression_ratio(self, nll: Number, tau: float) -> Number:
        """Fraction of the context to evict (kvpress convention) for quality target ``tau``, in [0, 1)."""
        retention = self.retention(nll, tau)
        return 1 - retention

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as JSON (with a format name and version)."""
        data = {"format": FORMAT, "version": FORMAT_VERSION, "alpha": self.alpha, "beta": self.beta}
        with open(path, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ContextCalibration:
        """Read a calibration written by ``save``."""
        with open(path) as file:
            data = json.load(file)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a context calibration file (format {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} has calibration format version {data.get('version')!r}; "
                f"this version of kvc_compile reads version {FORMAT_VERSION}"
            )
        return cls(alpha=float(data["alpha"]), beta=float(data["beta"]))


def _check_tau(tau: float) -> None:
    if not 0 < tau < 1:
        raise ValueError(f"tau (the quality target) must be in (0, 1), got {tau!r}")


def fit_calibration(
    retentions: Sequence[float] | Tensor,
    context_nlls: Sequence[float] | Tensor,
    qualities: Sequence[float] | Tensor,
    under_weight: float = 4.0,
    max_iter: int = 500,
) -> ContextCalibration:
    """Fit ``alpha, beta`` to measured ``(r, NLL(context), y)`` triples by asymmetric least squares.

    The loss is ``mean(w * (f(r, c) - y)^2)`` with ``w = under_weight`` where the model predicts a
    higher quality than measured (it would under-estimate the retention needed) and 1 elsewhere.
    Solved with L-BFGS in float64, started from the linear curve (``alpha=0, beta=1``).
    """
    r, nll, y = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (retentions, context_nlls, qualities))
    if not r.numel() == nll.numel() == y.numel():
        raise ValueError(
            f"retentions, context_nlls and qualities must have the same length, got {r.numel()}, "
            f"{nll.numel()}, {y.numel()}"
        )
    if r.numel() < 2:
        raise ValueError(f"fitting two parameters needs at least 2 measurements, got {r.numel()}")
    if not (torch.isfinite(r).all() and torch.isfinite(nll).all() and torch.isfinite(y).all()):
        raise ValueError("retentions, context_nlls and qualities must be finite")
    if ((r < 0) | (r > 1)).any():
        raise ValueError("retentions must be in [0, 1]")
    if not (math.isfinite(under_weight) and under_weight > 0):
        raise ValueError(f"under_weight must be a finite number > 0, got {under_weight!r}")

    params = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15
    )

    def loss_fn() -> Tensor:
        b = (params[0] * nll + params[1]).clamp_min(MIN_B)
        predicted = torch.exp(-b) * torch.expm1(b * r) / -torch.expm1(-b)
        error = predicted - y
        weight = torch.where(error > 0, under_weight, 1.0)
        return (weight * error.square()).mean()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    alpha, beta = params.detach().tolist()
    return ContextCalibration(alpha=alpha, beta=beta)


class QualityRow(NamedTuple):
    retention: float
    context_nll: float
    quality: float  # y(r) = NLL(continuation | full cache) / NLL(continuation | compressed cache)


def continuation_nll(model: PreTrainedModel, cache, continuation: Tensor, split: int) -> Tensor:
    """Teacher-forced NLL [batch] of ``continuation[:, 1:]`` read on a prefilled ``cache``.

    The first continuation token is predicted by the prefill's last logit, computed before any
    compression, so it is the same at every retention and is left out.
    """
    batch, length = continuation.shape
    positions = torch.arange(split, split + length, device=continuation.device)
    # The "kvc" implementation reads both dense and packed (per-head budget) layers.
    with attention_implementation(model, ATTENTION_IMPLEMENTATION):
        out = model.forward(
            input_ids=continuation,
            attention_mask=torch.ones(batch, split + length, dtype=torch.long, device=continuation.device),
            position_ids=positions.expand(batch, length),
            cache_position=positions,
            **with_cache(cache),
            use_cache=True,
        )
    return context_nll(out.logits, continuation)


@torch.no_grad()
def measure_quality(
    model: PreTrainedModel,
    input_ids: Tensor,
    split: int,
    retentions: Sequence[float],
    config_factory: Callable[[float], CompressionConfig | dict[str, Any]],
) -> list[QualityRow]:
    """Quality rows ``(r, NLL(context), y(r))`` for texts split into a context and a continuation.

    ``input_ids`` [batch, total] (or [total]) holds unpadded texts; the first ``split`` tokens are the
    context, which is prefilled and compressed by the reference path with ``config_factory(r)``
    (e.g. ``lambda r: {"method": "compactor", "compression_ratio": 1 - r}``); the rest is scored
    teacher-forced on that cache. ``y(r)`` divides the continuation's NLL on the uncompressed cache
    by its NLL on the compressed one. One row per text and retention, texts outer.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    total = input_ids.shape[1]
    if not 1 < split <= total - 2:
        raise ValueError(
            f"split must leave at least 2 context tokens and 2 continuation tokens, got split={split} "
            f"for {total} tokens"
        )
    context, continuation = input_ids[:, :split], input_ids[:, split:]
    full = model.forward(input_ids=context, **with_cache(DynamicCache()), use_cache=True)
    nll_context = context_nll(full.logits, context)
    nll_full = continuation_nll(model, output_cache(full), continuation, split)
    qualities = []
    for retention in retentions:
        if not 0 < retention <= 1:
            raise ValueError(f"retentions must be in (0, 1], got {retention!r}")
        prefill = reference_prefill(model, context, config_factory(retention))
        qualities.append(nll_full / continuation_nll(model, prefill.cache, continuation, split))
    return [
        QualityRow(float(retention), float(nll_context[row]), float(quality[row]))
        for row in range(input_ids.shape[0])
        for retention, quality in zip(retentions, qualities, strict=True)
    ]


__all__ = ["ContextCalibration", "QualityRow", "context_nll", "continuation_nll", "fit_calibration", "measure_quality"]
