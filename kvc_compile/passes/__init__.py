"""FX graph passes: find attention sites, insert compression after prefill attention, store the
cache at low rank."""

from kvc_compile.passes.attention_sites import AttentionSite, find_attention_sites
from kvc_compile.passes.lowrank_projection import FoldValueProjection, ProjectCacheToLowRank
from kvc_compile.passes.manager import NoAttentionSiteError, PassManager
from kvc_compile.passes.prefill_compression import InsertPrefillCompression

__all__ = [
    "AttentionSite",
    "FoldValueProjection",
    "InsertPrefillCompression",
    "NoAttentionSiteError",
    "PassManager",
    "ProjectCacheToLowRank",
    "find_attention_sites",
]
