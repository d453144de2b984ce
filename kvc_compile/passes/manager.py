"""The pass manager: analyses the graph once, then applies the kvc passes in a stated order."""

from __future__ import annotations

from torch import fx

import kvc_compile.cache.attention  # noqa: F401  (registers torch.ops.kvc.packed_attention)
from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import find_attention_sites, reads_packed_cache, root_module_name
from kvc_compile.passes.decode_compression import CompressDecodeCache, RecordRecentQueries
from kvc_compile.passes.lookahead import KeepPromptEntries
from kvc_compile.passes.lowrank_projection import (
    FoldValueProjection,
    FuseRopeIntoLowRankProjection,
    ProjectCacheToLowRank,
)
from kvc_compile.passes.prefill_compression import InsertPrefillCompression


class NoAttentionSiteError(RuntimeError):
    pass


class PassManager:
    """Order: (1) find attention sites, (2) insert prefill compression (token eviction), (3) keep
    each layer's recent queries where decode-time scoring or LAQ needs them, (4) keep the full
    prompt entries for LAQ's second stage, (5) evict inside decode graphs (MorphKV, periodic
    compression), which votes with the recent queries, (6) project what the cache stores to low
    rank (KQ-SVD), which must see the entries eviction kept, (7) fold the low-rank value lift of
    decode graphs into ``o_proj``, (8) fuse RoPE into the projection of each new key.

    ``decode_eviction=False`` leaves out (5): an engine's decode program for the steps that only
    append has the same cache shape as the one that evicts, so the shape cannot tell them apart."""

    def __init__(self, config: CompressionConfig, decode_eviction: bool = True) -> None:
        self.config = config
        self.passes = [
            InsertPrefillCompression(config),
            RecordRecentQueries(config),
            KeepPromptEntries(config),
            *([CompressDecodeCache(config)] if decode_eviction else []),
            ProjectCacheToLowRank(config),
            FoldValueProjection(),
            FuseRopeIntoLowRankProjection(),
        ]

    def run(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` in place; returns the number of prefill sites rewritten (0 for decode graphs)."""
        sites = find_attention_sites(gm.graph)
        if not sites and not reads_packed_cache(gm.graph):
            raise NoAttentionSiteError(
                f"kvc: no attention site found in the graph traced from {root_module_name(gm)}. The pass "
                f"recognises scaled_dot_product_attention and transformers' eager attention whose keys and "
                f"values are also returned as the KV cache: call the model with use_cache=True, and compile "
                f"the whole decoder (a graph break inside attention hides it; fullgraph=True shows where). "
                f"Sliding-window layers cache only a slice of what attention reads and are left uncompressed: "
                f"a model whose every layer slides (config.sliding_window set) has nothing to compress."
            )
        rewritten = [p(gm, sites) for p in self.passes][0]  # every pass runs; the first counts prefill sites
        gm.graph.lint()
        gm.recompile()
        return rewritten
