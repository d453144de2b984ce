"""Compression methods: one file each, registered by name. Pure PyTorch; the oracle for every
compiled and kernel path."""

from __future__ import annotations

from kvc_compile.methods.base import Method, ScoreInputs
from kvc_compile.methods.knorm import KNorm
from kvc_compile.methods.random import Random
from kvc_compile.methods.snapkv import SnapKV
from kvc_compile.methods.streamingllm import StreamingLLM

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SnapKV, StreamingLLM, KNorm, Random)}


def list_methods() -> list[str]:
    """Names of every registered compression method."""
    return sorted(METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}") from None


__all__ = ["METHODS", "Method", "ScoreInputs", "list_methods", "method_class"]
