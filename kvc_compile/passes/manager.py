"""The pass manager: analyses the graph once, checks that the configuration fits the traced model,
then applies the kvc passes that apply to the configuration, in a stated order."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx
from transformers import PreTrainedModel

import kvc_compile.ops  # noqa: F401  (registers every kvc:: op)
from kvc_compile.cache import sliding_windows
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import (
    AttentionSite,
    find_attention_sites,
    reads_packed_cache,
    root_module_name,
    traced_config,
    traced_module,
)
from kvc_compile.passes.base import GraphPass, RewriteRecord
from kvc_compile.passes.decode_compression import CompressDecodeCache, RecordRecentQueries
from kvc_compile.passes.grouped_decode import GroupDecodeAttention
from kvc_compile.passes.lookahead import KeepPromptEntries
from kvc_compile.passes.lowrank_projection import (
    FoldValueProjection,
    FuseRopeIntoLowRankProjection,
    ProjectCacheToLowRank,
)
from kvc_compile.passes.prefill_compression import PREFILL_ENTRIES, CacheLayoutError, InsertPrefillCompression
from kvc_compile.transformers_compat import CACHE_ARG

SLIDING_LAYERS_NOTE = (
    "Sliding-window layers cache only a slice of what attention reads and are left uncompressed: a model whose "
    "every layer slides (config.sliding_window set) has nothing to compress."
)


# The order the passes run in; see ``PassManager``.
PASSES: tuple[type[GraphPass], ...] = (
    InsertPrefillCompression,
    RecordRecentQueries,
    KeepPromptEntries,
    CompressDecodeCache,
    ProjectCacheToLowRank,
    GroupDecodeAttention,
    FoldValueProjection,
    FuseRopeIntoLowRankProjection,
)


class NoAttentionSiteError(RuntimeError):
    pass


class UnverifiedModelWarning(UserWarning):
    """A check that needs the model (KQ-SVD projections against its weights) could not run."""


def pretrained_model(module: torch.nn.Module | None) -> PreTrainedModel | None:
    """The transformers model ``module`` is, or the first one inside it."""
    if module is None or isinstance(module, PreTrainedModel):
        return module
    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def no_attention_site_message(config: CompressionConfig, model_name: str, model_config: Any) -> str:
    """Why a graph shows no attention site, with the fix that applies to this configuration."""
    stores_special_layout = config.lowrank is not None or (config.evicts and config.method_impl.layout == "packed")
    attention = getattr(model_config, "_attn_implementation", None)
    if stores_special_layout and attention != ATTENTION_IMPLEMENTATION:
        what = "low-rank (KQ-SVD)" if config.lowrank is not None else "packed (per-head or per-layer budget)"
        uses = f"the model uses attn_implementation={attention!r}" if attention else "the model may not use it"
        return (
            f"kvc: {config.method} stores a {what} cache, which only the 'kvc' attention implementation reads, and "
            f"{uses}: load the model with attn_implementation='kvc' (after `import kvc_compile`), or call "
            f"model.set_attn_implementation('kvc') before compiling"
        )
    return (
        f"kvc: no attention site found in the graph traced from {model_name}. The pass "
        f"recognises scaled_dot_product_attention and transformers' eager attention whose keys and "
        f"values are also returned as the KV cache: call the model with use_cache=True, and compile "
        f"the whole decoder (a graph break inside attention hides it; fullgraph=True shows where). "
        f"{SLIDING_LAYERS_NOTE}"
    )


def padding_mask_input(gm: fx.GraphModule, site: AttentionSite) -> int | None:
    """The index among the graph's inputs of the 2-D attention mask ([batch, n], 0 = padding) the site's
    attention mask is built from, if it is built from one."""
    if site.mask is None:
        return None
    seen, stack, found = set(), [site.mask], None
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            value = node.meta.get("val", node.meta.get("example_value"))
            if (isinstance(value, torch.Tensor) and value.ndim == 2 and "attention_mask" in node.name
                    and (value.dtype == torch.bool or not value.dtype.is_floating_point)):
                found = node
            continue
        stack.extend(n for n in node.all_input_nodes if n not in seen)
    if found is None:
        return None
    return [node for node in gm.graph.nodes if node.op == "placeholder"].index(found)


class PassManager:
    """Order (``PASSES``): (1) find attention sites, (2) insert prefill compression (token eviction),
    (3) keep each layer's recent queries where decode-time scoring or LAQ needs them, (4) keep the full
    prompt entries for LAQ's second stage, (5) evict inside decode graphs (MorphKV, periodic
    compression), which votes with the recent queries, (6) project what the cache stores to low
    rank (KQ-SVD), which must see the entries eviction kept, (7) read a dense cache once per decode
    step with native GQA instead of transformers' per-head repeat, (8) fold the low-rank value lift of
    decode graphs into ``o_proj`` and drop dead nodes (the repeat among them), (9) fuse RoPE into the
    projection of each new key. Of (2)-(9), only
    the passes that apply to the configuration (``GraphPass.applies``) run; they hand their results on
    in one ``RewriteRecord``.

    ``decode_eviction=False`` leaves out (5): an engine's decode program for the steps that only
    append has the same cache shape as the one that evicts, so the shape cannot tell them apart.
    ``fuse_rope=False`` leaves out (9), whose fused op an ONNX engine has no node for.

    ``model``: the model the graph was traced from, for the checks that need it (KQ-SVD projections
    calibrated on it, sliding-window layers); without it, the module Dynamo is converting is used.
    After ``run``, ``sites`` are the graph's attention sites, and ``padding_mask_index`` is the graph
    input whose padding the compressed cache cannot represent (a plain ``DynamicCache`` under a 2-D
    attention mask), or None.
    """

    def __init__(
        self, config: CompressionConfig, decode_eviction: bool = True, model: torch.nn.Module | None = None,
        fuse_rope: bool = True,
    ) -> None:
        self.config = config
        self.model = model
        self.padding_mask_index: int | None = None
        self.sites: list[AttentionSite] = []
        left_out = {CompressDecodeCache} if not decode_eviction else set()
        left_out |= {FuseRopeIntoLowRankProjection} if not fuse_rope else set()
        order = tuple(p for p in PASSES if p not in left_out)
        self.passes: list[GraphPass] = [p(config) for p in order if p.applies(config)]

    @property
    def compiles_prefill(self) -> bool:
        """Whether the graph ``run`` rewrote prefills the cache (else it decodes, or has no site)."""
        return any(site.is_prefill for site in self.sites)

    def run(self, gm: fx.GraphModule) -> int:
        """Rewrite ``gm`` in place; returns the number of prefill sites (0 for decode graphs)."""
        sites = self.sites = find_attention_sites(gm.graph)
        model = pretrained_model(self.model if self.model is not None else traced_module(gm))
        if not sites and not reads_packed_cache(gm.graph):
            model_config = model.config if model is not None else traced_config(gm)
            raise NoAttentionSiteError(no_attention_site_message(self.config, root_module_name(gm), model_config))
        prefill_sites = [site for site in sites if site.is_prefill]
        if prefill_sites:
            self._check_model(model, prefill_sites, gm)
            self.padding_mask_index = self._unrepresentable_padding(gm, prefill_sites)
        record = RewriteRecord(sites)
        for graph_pass in self.passes:
            graph_pass(gm, record)
        gm.graph.lint()
        gm.recompile()
        return len(prefill_sites)

    def _check_model(self, model: PreTrainedModel | None, prefill_sites: list[AttentionSite], gm) -> None:
        if model is None:
            if self.config.lowrank is not None:
                warnings.warn(
                    f"kvc: the model traced into this graph was not found, so the projections file "
                    f"{self.config.lowrank['projections']} was not checked against its weights; compile the "
                    f"transformers model itself (model.compile(backend='kvc', ...)) to have it checked",
                    UnverifiedModelWarning, stacklevel=2,
                )
            return
        self.config.check_model(model)  # KQ-SVD projections from another model: CalibrationMismatchError
        windows = sliding_windows(model.config)
        if windows and len(prefill_sites) > model.config.get_text_config(decoder=True).num_hidden_layers - len(windows):
            cache = "CompressedCache" if self._records_entries(prefill_sites) else "DynamicCache"
            raise CacheLayoutError(
                f"kvc: {type(model).__name__} has sliding-window layers (window {max(windows.values())}), but the "
                f"{cache} it was called with keeps every token of them, so compressing them would store more than "
                f"the window: pass {CACHE_ARG}=kvc_compile.CompressedCache(config=model.config) (or "
                f"DynamicCache(config=model.config)), which keeps only the window of a sliding layer"
            )

    @staticmethod
    def _records_entries(prefill_sites: list[AttentionSite]) -> bool:
        """Whether the cache records kept positions (``CompressedCache``), as a plain ``DynamicCache`` does not."""
        keys = prefill_sites[0].new_keys
        return keys is not None and any(
            user.op == "call_function" and user.target in PREFILL_ENTRIES for user in keys.users
        )

    def _unrepresentable_padding(self, gm: fx.GraphModule, prefill_sites: list[AttentionSite]) -> int | None:
        """A plain ``DynamicCache`` does not know that a compressed layer's entries stand for more positions
        than it holds: decoding then lines the attention mask up with the wrong entries, and a left-padded
        row attends to padding. Whether a row is padded is data, so the backend checks that input when the
        graph runs."""
        if not self.config.evicts or self.config.compression_ratio == 0 or self._records_entries(prefill_sites):
            return None
        return padding_mask_input(gm, prefill_sites[0])
