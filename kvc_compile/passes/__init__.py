"""FX graph passes: find attention sites, insert compression after prefill attention, keep recent
queries and evict while decoding, store the cache at low rank."""

from kvc_compile.passes.attention_sites import AttentionSite, find_attention_sites
from kvc_compile.passes.decode_compression import CompressDecodeCache, RecordRecentQueries
from kvc_compile.passes.lookahead import KeepPromptEntries
from kvc_compile.passes.lowrank_projection import (
    FoldValueProjection,
    FuseRopeIntoLowRankProjection,
    ProjectCacheToLowRank,
)
from kvc_compile.passes.manager import NoAttentionSiteError, PassManager
from kvc_compile.passes.prefill_compression import InsertPrefillCompression

__all__ = [
    "AttentionSite",
    "CompressDecodeCache",
    "FoldValueProjection",
    "FuseRopeIntoLowRankProjection",
    "InsertPrefillCompression",
    "KeepPromptEntries",
    "NoAttentionSiteError",
    "PassManager",
    "ProjectCacheToLowRank",
    "RecordRecentQueries",
    "find_attention_sites",
]
