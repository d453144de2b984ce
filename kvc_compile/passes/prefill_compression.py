"""Insert KV compression after every prefill attention site (``InsertPrefillCompression``), and the
graph-editing helpers the other passes share (fake values for inserted nodes, getitems, RoPE tables).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import ShapeEnv, compute_unbacked_bindings

import kvc_compile.ops  # noqa: F401  (registers torch.ops.kvc.*)
from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import (
    ADD_TARGETS,
    AttentionSite,
    fake_value,
    linear_weight,
    output_projection,
)
from kvc_compile.passes.base import GraphPass, RewriteRecord, SiteRewrite
from kvc_compile.transformers_compat import CACHE_ARG

MUL_TARGETS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
PREFILL_ENTRIES = {torch.ops.kvc.prefill_entries.default, torch.ops.kvc.prefill_entries}


class CacheLayoutError(RuntimeError):
    pass


def rotary_tables(k_rope: fx.Node | None) -> tuple[fx.Node | None, fx.Node | None]:
    """``(cos, sin)`` if ``k_rope = k * cos + rotate_half(k) * sin`` (transformers' RoPE), else Nones."""
    if k_rope is None or not (k_rope.op == "call_function" and k_rope.target in ADD_TARGETS):
        return None, None
    terms = [a for a in k_rope.args if isinstance(a, fx.Node)]
    if len(terms) != 2 or not all(t.op == "call_function" and t.target in MUL_TARGETS for t in terms):
        return None, None
    (_, cos), (_, sin) = terms[0].args[:2], terms[1].args[:2]
    if not all(isinstance(x, fx.Node) for x in (cos, sin)):
        return None, None
    key_shape, cos_shape = fake_value(k_rope).shape, fake_value(cos).shape
    if cos_shape[-1] != key_shape[-1] or len(cos_shape) != len(key_shape):
        return None, None
    return cos, sin


def entry_markers(graph: fx.Graph, k_rope: fx.Node | None) -> tuple[fx.Node, fx.Node] | None:
    """The getitems of ``kvc.prefill_entries(k_rope)`` (positions, heads), if the cache records them."""
    if k_rope is None:
        return None
    for user in k_rope.users:
        if user.op == "call_function" and user.target in PREFILL_ENTRIES:
            items = {u.args[1]: u for u in user.users if u.target is operator.getitem}
            if 0 in items and 1 in items:
                return items[0], items[1]
    return None


def allow_data_dependent_sizes(shape_env: ShapeEnv | None) -> None:
    """Let this graph's shape environment create sizes that depend on data (``compress_layers``).

    Dynamo only allows such ops under ``fullgraph=True``; our op is one we inserted after tracing,
    whose sizes flow only into the cache outputs, so the graph being compiled may have them.
    """
    if shape_env is None:
        raise CacheLayoutError("kvc: budgets across layers need a graph traced with a shape environment")
    if not shape_env.allow_dynamic_output_shape_ops:
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_dynamic_output_shape_ops=True)


class InsertPrefillCompression(GraphPass):
    """Rewire each prefill site's cache outputs to the outputs of ``kvc::compress_kv``.

    Before (one layer of a prefill graph; ``keys``/``values`` are returned, the cache stores them)::

        keys = cat([empty, k_rope], -2); values = cat([empty, v], -2)
        positions, heads = kvc.prefill_entries(k_rope)          # only with CompressedCache
        out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
        return (..., keys, values, positions, heads, ...)

    After::

        ...
        out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
        kept = kvc.compress_kv(q_rope, keys, values, mask, cos, sin, layer_idx, n_layers, spec[, o_proj.weight])
        return (..., kept[0], kept[1], kept[2], kept[3], ...)

    Prefill attention itself still reads the full cache; only the cache outputs are rewired, so the
    cache object ends up holding the kept entries. ``cos``/``sin`` are the rotary tables applied to
    ``k_rope`` (found from the RoPE pattern ``k * cos + rotate_half(k) * sin``), for methods that
    score pre-RoPE keys; ``o_proj.weight`` is passed only to methods that read it (CriticalKV), found
    from the attention output through layout-only ops. Decode graphs (query length 1) and continuation
    chunks (something already cached) are left as they are.

    For methods whose layer budgets depend on every layer (``budgets_across_layers``), each site
    gets a ``kvc::score_kv(...)`` instead, and one ``kvc::compress_layers(scores, keys, values, mask,
    spec)`` before the graph's output compresses all layers; its items ``4 * i .. 4 * i + 3`` are
    layer ``i``'s ``kept``, rewired the same way.

    Records the rewired keys and values (and, packed, head labels) as what each site stores.
    """

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.spec = config.to_spec()

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return config.evicts  # rank compression alone keeps every token

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        graph = gm.graph
        prefill_sites = record.prefill_sites
        n_layers = len(prefill_sites)
        joint = self.config.method_impl.budgets_across_layers
        op = torch.ops.kvc.score_kv.default if joint else torch.ops.kvc.compress_kv.default
        site_nodes, markers = [], []
        for site in prefill_sites:
            args, site_markers = self._site_args(graph, site, n_layers)
            with graph.inserting_after(site.attention):
                node = graph.call_function(op, args)
            propagate_meta(node, op, args)
            site_nodes.append(node)
            markers.append(site_markers)
        if joint and prefill_sites:
            args = (
                site_nodes,
                [site.cached_keys for site in prefill_sites],
                [site.cached_values for site in prefill_sites],
                prefill_sites[0].mask,
                self.spec,
            )
            with graph.inserting_before(graph.output_node()):
                node = graph.call_function(torch.ops.kvc.compress_layers.default, args)
            propagate_meta(node, torch.ops.kvc.compress_layers.default, args)
            site_outputs = [(node, 4 * index) for index in range(n_layers)]
        else:
            site_outputs = [(node, 0) for node in site_nodes]
        packed = self.config.method_impl.layout == "packed"
        for site, site_markers, (node, first) in zip(prefill_sites, markers, site_outputs, strict=True):
            self._rewire(graph, record.of(site), site, site_markers, node, first, packed)
        return n_layers

    def _site_args(self, graph: fx.Graph, site: AttentionSite, n_layers: int) -> tuple[tuple, tuple | None]:
        method = self.config.method_impl
        k_rope = site.new_keys
        cos, sin = rotary_tables(k_rope)
        if method.needs_rotary and cos is None:
            raise CacheLayoutError(
                f"kvc: {self.config.method} scores pre-RoPE keys, but no rotary embedding "
                f"(k * cos + rotate_half(k) * sin) feeds the keys of attention layer {site.layer_idx}; "
                f"use a method that reads post-RoPE keys only, or a RoPE model (Llama, Mistral, Qwen2, Qwen3)"
            )
        markers = entry_markers(graph, k_rope)
        if method.layout == "packed" and markers is None:
            raise CacheLayoutError(
                f"kvc: {self.config.method} gives KV heads or layers different budgets and stores them in "
                f"the packed layout, which only kvc_compile.CompressedCache holds: call the model with "
                f"{CACHE_ARG}=kvc_compile.CompressedCache() (and attn_implementation='kvc')"
            )
        args = (
            site.query, site.cached_keys, site.cached_values, site.mask, cos, sin, site.layer_idx, n_layers, self.spec,
        )
        if method.needs_output_projection:
            o_proj = output_projection(site.attention)
            if o_proj is None:
                raise CacheLayoutError(
                    f"kvc: {self.config.method} weighs entries by the output projection, but no linear o_proj "
                    f"follows the attention of layer {site.layer_idx}; use a method that does not read it "
                    f"(e.g. {getattr(method, 'scorer', 'snapkv')}), or a model whose attention output goes "
                    f"through o_proj (Llama, Mistral, Qwen2, Qwen3)"
                )
            args += (linear_weight(o_proj),)
        return args, markers

    @staticmethod
    def _rewire(
        graph: fx.Graph, rewrite: SiteRewrite, site: AttentionSite, markers: tuple | None, node: fx.Node, first: int,
        packed: bool,
    ) -> None:
        """Point the site's cache outputs at items ``first .. first + 3`` of ``node``."""
        items = getitems(graph, node, range(first, first + 4))
        output = graph.output_node()
        output.replace_input_with(site.cached_keys, items[0])
        output.replace_input_with(site.cached_values, items[1])
        if markers is not None:
            output.replace_input_with(markers[0], items[2])
            output.replace_input_with(markers[1], items[3])
        rewrite.stored_keys, rewrite.stored_values = items[0], items[1]
        rewrite.stored_heads = items[3] if packed else None


def getitems(graph: fx.Graph, node: fx.Node, indices) -> list[fx.Node]:
    """``node[i]`` for each index, as getitem nodes right after ``node``, carrying its fake values."""
    key = "val" if "val" in node.meta else "example_value"
    items, anchor = [], node
    for index in indices:
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (node, index))
        anchor.meta[key] = node.meta[key][index]
        items.append(anchor)
    return items


def propagate_meta(node: fx.Node, op, args: tuple) -> None:
    """Give a node the pass inserted its fake value, as Dynamo and export graphs carry one on every node."""

    def fake(arg):
        if isinstance(arg, (list, tuple)):
            return [fake(a) for a in arg]
        return fake_value(arg) if isinstance(arg, fx.Node) else arg

    fakes = [fake(a) for a in args]
    fake_mode = next(f.fake_mode for f in pytree.tree_leaves(fakes) if isinstance(f, FakeTensor))
    if op is torch.ops.kvc.compress_layers.default:
        allow_data_dependent_sizes(fake_mode.shape_env)
    with fake_mode:
        result = op(*fakes)
    first_input = next(a for a in pytree.tree_leaves(list(args)) if isinstance(a, fx.Node))
    node.meta["val" if "val" in first_input.meta else "example_value"] = result
    # Claim the data-dependent sizes this node defines, as Dynamo does for the nodes it traces.
    if fake_mode.shape_env is not None and (bindings := compute_unbacked_bindings(fake_mode.shape_env, result)):
        node.meta["unbacked_bindings"] = bindings
