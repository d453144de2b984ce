"""Shared plumbing for methods that wrap another scorer (``adakv``, ``chunkkv``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from kvc_compile.methods.base import Method, ScoreInputs
from kvc_compile.methods.registry import build_method


def build_scorer(wrapper: str, scorer: str, scorer_options: dict[str, Any]) -> Method:
    """The inner scorer of a wrapper, validated like a top-level method."""
    if not isinstance(scorer_options, dict):
        raise ValueError(f"{wrapper}: scorer_options must be a dict of the scorer's options, got {scorer_options!r}")
    inner = build_method(scorer, scorer_options)
    if inner.layout != "dense":
        raise ValueError(
            f"{wrapper}: scorer {scorer!r} already chooses its own per-head or per-layer budgets; "
            f"wrap a method that scores tokens for a uniform budget (e.g. snapkv, knorm, compactor)"
        )
    if inner.needs_output_projection:
        raise ValueError(
            f"{wrapper}: scorer {scorer!r} ranks in two stages with its own selection; wrap the scorer it wraps "
            f"instead (e.g. snapkv), or use criticaladakv for CriticalKV with head-adaptive budgets"
        )
    return inner


@dataclass(frozen=True)
class ScorerWrapper(Method):
    """A method built around another method's scores; subclasses change how they are selected."""

    scorer: str = "snapkv"
    scorer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inner", build_scorer(self.name, self.scorer, self.scorer_options))

    @property
    def needs_rotary(self) -> bool:  # type: ignore[override]
        return self.inner.needs_rotary

    @property
    def min_uncompressed_length(self) -> int:
        return self.inner.min_uncompressed_length

    @property
    def queries_read(self) -> int | None:
        return self.inner.queries_read

    @property
    def decoding_queries(self) -> int | None:
        return self.inner.decoding_queries

    def score(self, inputs: ScoreInputs) -> Tensor:
        return self.inner.score(inputs)
