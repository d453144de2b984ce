"""Shared plumbing for methods that wrap another scorer (``adakv``, ``chunkkv``)."""

from __future__ import annotations

from typing import Any

from kvc_compile.methods.base import Method


def build_scorer(wrapper: str, scorer: str, scorer_options: dict[str, Any]) -> Method:
    """The inner scorer of a wrapper, validated like a top-level method."""
    from kvc_compile.methods import build_method  # the registry imports the wrappers

    if not isinstance(scorer_options, dict):
        raise ValueError(f"{wrapper}: scorer_options must be a dict of the scorer's options, got {scorer_options!r}")
    inner = build_method(scorer, scorer_options)
    if inner.layout != "dense":
        raise ValueError(
            f"{wrapper}: scorer {scorer!r} already chooses its own per-head or per-layer budgets; "
            f"wrap a method that scores tokens for a uniform budget (e.g. snapkv, knorm, compactor)"
        )
    return inner
