"""FX graph passes: find attention sites, insert compression after prefill attention, keep recent
queries and evict while decoding, store the cache at low rank. Each pass is a ``GraphPass``; the
``PassManager`` runs those that apply, in order, handing results on in a ``RewriteRecord``."""

from kvc_compile.passes.attention_sites import AttentionSite, find_attention_sites
from kvc_compile.passes.base import GraphPass, RewriteRecord, SiteRewrite
from kvc_compile.passes.decode_compression import CompressDecodeCache, RecordRecentQueries
from kvc_compile.passes.lookahead import KeepPromptEntries
from kvc_compile.passes.lowrank_projection import (
    FoldValueProjection,
    FuseRopeIntoLowRankProjection,
    ProjectCacheToLowRank,
)
from kvc_compile.passes.manager import PASSES, NoAttentionSiteError, PassManager
from kvc_compile.passes.prefill_compression import InsertPrefillCompression

__all__ = [
    "AttentionSite",
    "CompressDecodeCache",
    "FoldValueProjection",
    "FuseRopeIntoLowRankProjection",
    "GraphPass",
    "InsertPrefillCompression",
    "KeepPromptEntries",
    "NoAttentionSiteError",
    "PASSES",
    "PassManager",
    "ProjectCacheToLowRank",
    "RecordRecentQueries",
    "RewriteRecord",
    "SiteRewrite",
    "find_attention_sites",
]
