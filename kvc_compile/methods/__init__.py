"""Compression methods: one file each, registered by name. Pure PyTorch; the oracle for every
compiled and kernel path."""

from __future__ import annotations

from kvc_compile.methods.adacurdkv import AdaCurDKV
from kvc_compile.methods.adakv import AdaKV
from kvc_compile.methods.base import Method, ScoreInputs
from kvc_compile.methods.chunkkv import ChunkKV
from kvc_compile.methods.compactor import Compactor
from kvc_compile.methods.criticaladakv import CriticalAdaKV
from kvc_compile.methods.criticalkv import CriticalKV
from kvc_compile.methods.curdkv import CurDKV
from kvc_compile.methods.expected_attention import ExpectedAttention
from kvc_compile.methods.h2o import H2O
from kvc_compile.methods.keydiff import KeyDiff
from kvc_compile.methods.knorm import KNorm
from kvc_compile.methods.lagkv import LagKV
from kvc_compile.methods.laq import LAQ
from kvc_compile.methods.lava import LAVa
from kvc_compile.methods.morphkv import MorphKV
from kvc_compile.methods.obcache import OBCache
from kvc_compile.methods.pyramidkv import PyramidKV
from kvc_compile.methods.qfilters import QFilters
from kvc_compile.methods.random import Random
from kvc_compile.methods.registry import (
    LOWRANK_METHOD,
    METHODS,
    build_method,
    list_methods,
    list_token_methods,
    method_class,
    register,
)
from kvc_compile.methods.snapkv import SnapKV
from kvc_compile.methods.streamingllm import StreamingLLM
from kvc_compile.methods.tova import TOVA

for _cls in (
    SnapKV, StreamingLLM, KNorm, Random, H2O, TOVA, ExpectedAttention, OBCache, CurDKV, AdaCurDKV, Compactor,
    LAVa, PyramidKV, AdaKV, ChunkKV, MorphKV, LAQ, KeyDiff, LagKV, CriticalKV, CriticalAdaKV, QFilters,
):
    register(_cls)

__all__ = [
    "LOWRANK_METHOD",
    "METHODS",
    "Method",
    "ScoreInputs",
    "build_method",
    "list_methods",
    "list_token_methods",
    "method_class",
    "register",
]
