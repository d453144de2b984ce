"""Compression while decoding: keep a buffer of recent queries (``RecordRecentQueries``), and evict
inside decode graphs (``CompressDecodeCache``), voting with that buffer."""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import fx

import kvc_compile.ops.decode  # noqa: F401  (registers the decode ops)
from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import AttentionSite
from kvc_compile.passes.base import GraphPass, RewriteRecord
from kvc_compile.passes.prefill_compression import (
    CacheLayoutError,
    getitems,
    propagate_meta,
    rotary_tables,
)
from kvc_compile.transformers_compat import CACHE_ARG

kvc = torch.ops.kvc


def marker_user(k_rope: fx.Node | None, *ops) -> fx.Node | None:
    """The call of one of ``ops`` (a cache marker) on this layer's new keys, if the cache made one."""
    if k_rope is None:
        return None
    targets = {target for op in ops for target in (op, op.default)}
    return next((user for user in k_rope.users if user.op == "call_function" and user.target in targets), None)


def replace_node(graph: fx.Graph, old: fx.Node, op, args: tuple, before: fx.Node) -> fx.Node:
    """Insert ``op(*args)`` before ``before``, let it take every use of ``old``, and drop ``old``."""
    with graph.inserting_before(before):
        node = graph.call_function(op, args)
    propagate_meta(node, op, args)
    old.replace_all_uses_with(node)
    graph.erase_node(old)
    return node


class RecordRecentQueries(GraphPass):
    """Rewire the cache's query markers so each layer keeps its newest ``W`` queries: the queries
    decode-time scorers vote with, and LAQ's second stage scores with.

    Before (prefill and decode layers of ``CompressedCache``, which cannot see queries)::

        buffer = kvc.recent_queries(k_rope)                # prefill: nothing recorded
        buffer = kvc.push_query(buffer_in, k_rope)         # decode: unchanged
        return (..., buffer, ...)

    After::

        buffer = kvc.last_queries(q_rope, W)               # prefill: the prompt's last W queries
        buffer = kvc.shift_in(buffer_in, q_rope)           # decode: the newest query in, the oldest out
        return (..., buffer, ...)

    Records each site's ``buffer`` as its recent queries.
    """

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.window = config.recent_queries

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return config.recent_queries > 0

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        graph = gm.graph
        for site in record.sites:
            k_rope = site.new_keys
            # The cache calls this marker on a layer's first update only: a prompt, even of one token
            # (which traces like a decode step).
            marker = marker_user(k_rope, kvc.recent_queries)
            if marker is not None:
                record.of(site).recent_queries = replace_node(
                    graph, marker, kvc.last_queries.default, (site.query, self.window), site.attention
                )
                continue
            marker = marker_user(k_rope, kvc.push_query)
            if marker is not None:
                record.of(site).recent_queries = replace_node(
                    graph, marker, kvc.shift_in.default, (marker.args[0], site.query), site.attention
                )
        return len(record.sites)


class CompressDecodeCache(GraphPass):
    """Evict inside decode graphs whose layers reached ``target_size + decoding_interval`` entries.

    That size is a shape the graph is specialised on, so the check costs nothing at run time and the
    other steps' graph stays untouched. Each layer is checked against its own threshold
    (``CompressionConfig.evicts_while_decoding``): layer-budget methods (PyramidKV) give layers
    different targets. Before::

        keys = cat([past_keys, k_rope], -2); values = cat([past_values, v], -2)
        positions = kvc.append_positions(past_positions, k_rope, logical_length)
        out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
        return (..., keys, values, positions, ...)

    After::

        ...
        out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
        kept = kvc.compress_decode(buffer, keys, values, positions, mask, layer_idx, n_layers, spec)
        return (..., kept[0], kept[1], kept[2], ...)

    ``buffer`` is the site's recent queries, as ``RecordRecentQueries`` recorded them. As at prefill,
    the step's own attention reads every entry; the cache keeps ``target_size``. Scorers of pre-RoPE
    queries (Expected Attention) get ``kvc.compress_decode_rotary`` instead, which also takes the
    step's rotary tables and the model's ``inv_freq`` (a graph input): the tables of the buffered
    queries' positions are counted back from the newest token's. With MorphKV (``decoding_interval``
    1) every step's cache has the same shape, so one compiled graph serves every token.

    Packed layers (per-head or per-layer budgets) are read by ``kvc.packed_attention(q, keys, values,
    heads, kv_heads, scale)`` instead of SDPA; such a site is rewired the same way, with its head
    labels::

        kept = kvc.compress_decode_packed(buffer, keys, values, heads, positions, cos, sin, inv_freq,
                                          kv_heads, layer_idx, n_layers, spec)
        return (..., kept[0], kept[1], kept[2], kept[3], ...)

    Records the kept keys and values (and, packed, head labels) as what each evicting site stores.
    """

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.spec = config.to_spec()

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return config.decode_target is not None

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        graph = gm.graph
        decode_sites = record.decode_sites
        n_layers = len(decode_sites)
        # A comparison on the (possibly symbolic) cache length: the graph is specialised on it.
        evicting = [site for site in decode_sites
                    if self.config.evicts_while_decoding(site.entries_per_head, site.layer_idx, n_layers)]
        inv_freq = self.inverse_frequencies(graph) if evicting and self.config.method_impl.needs_rotary else None
        for site in evicting:
            rewrite = record.of(site)
            positions = marker_user(site.new_keys, kvc.append_positions, kvc.append_positions_at)
            buffer = rewrite.recent_queries
            if positions is None or buffer is None:
                raise CacheLayoutError(
                    f"kvc: {self.config.method} compresses while decoding, which needs the cache to keep "
                    f"positions and recent queries: generate with {CACHE_ARG}=kvc_compile.CompressedCache() "
                    f"and a single new token per step"
                )
            rotary = (*self.step_tables(site), inv_freq) if inv_freq is not None else None
            layer = (site.layer_idx, n_layers, self.spec)
            if site.packed:
                op = kvc.compress_decode_packed.default
                args = (buffer, site.cached_keys, site.cached_values, site.cached_heads, positions,
                        *(rotary or (None, None, None)), site.kv_heads, *layer)
                replaced = (site.cached_keys, site.cached_values, site.cached_heads, positions)
            else:
                op = kvc.compress_decode.default if rotary is None else kvc.compress_decode_rotary.default
                args = (buffer, site.cached_keys, site.cached_values, positions, site.mask, *(rotary or ()), *layer)
                replaced = (site.cached_keys, site.cached_values, positions)
            with graph.inserting_after(site.attention):
                node = graph.call_function(op, args)
            propagate_meta(node, op, args)
            kept = getitems(graph, node, range(len(replaced)))
            output = graph.output_node()
            for old, new in zip(replaced, kept, strict=True):
                output.replace_input_with(old, new)
            rewrite.stored_keys, rewrite.stored_values = kept[0], kept[1]
            rewrite.stored_heads = kept[2] if site.packed else None
        return len(evicting)

    def inverse_frequencies(self, graph: fx.Graph) -> fx.Node:
        """The model's ``rotary_emb.inv_freq`` (a graph input): a scorer of pre-RoPE queries counts the
        tables of the recent queries' positions back from the step's tables with it."""
        inv_freq = next((node for node in graph.nodes if node.op in ("placeholder", "get_attr")
                         and "inv_freq" in str(node.target)), None)
        if inv_freq is None:
            self.no_rotary()
        return inv_freq

    def step_tables(self, site: AttentionSite) -> tuple[fx.Node, fx.Node]:
        """The rotary tables the step's keys were rotated with."""
        cos, sin = rotary_tables(site.new_keys)
        if cos is None:
            self.no_rotary()
        return cos, sin

    def no_rotary(self) -> NoReturn:
        raise CacheLayoutError(
            f"kvc: {self.config.method} un-rotates recent queries while decoding, but no rotary embedding "
            f"(transformers' rotate_half RoPE and its inv_freq buffer) was found in the decode graph; "
            f"it supports Llama, Mistral, Qwen2 and Qwen3"
        )
