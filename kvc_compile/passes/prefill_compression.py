"""Insert KV compression after every prefill attention site.

Before (one layer of a prefill graph; ``keys``/``values`` are returned, the cache stores them)::

    keys = cat([empty, k_rope], -2); values = cat([empty, v], -2)
    positions, heads = kvc.prefill_entries(k_rope)          # only with CompressedCache
    out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
    return (..., keys, values, positions, heads, ...)

After::

    ...
    out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
    kept = kvc.compress_kv(q_rope, keys, values, mask, cos, sin, layer_idx, n_layers, spec)
    return (..., kept[0], kept[1], kept[2], kept[3], ...)

Prefill attention itself still reads the full cache; only the cache outputs are rewired, so the
cache object ends up holding the kept entries. ``cos``/``sin`` are the rotary tables applied to
``k_rope`` (found from the RoPE pattern ``k * cos + rotate_half(k) * sin``), for methods that
score pre-RoPE keys. Decode graphs (query length 1) and continuation chunks (something already
cached) are left as they are.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from kvc_compile.config import CompressionConfig
from kvc_compile.ops import compress_kv, prefill_entries  # noqa: F401  (registers torch.ops.kvc.*)
from kvc_compile.passes.attention_sites import ADD_TARGETS, AttentionSite, fake_value

MUL_TARGETS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
CAT_TARGETS = {torch.cat, torch.ops.aten.cat.default}
PREFILL_ENTRIES = {torch.ops.kvc.prefill_entries.default, torch.ops.kvc.prefill_entries}


class CacheLayoutError(RuntimeError):
    pass


def new_key_states(cached_keys: fx.Node) -> fx.Node | None:
    """``k_rope`` in ``cached_keys = cat([empty, k_rope], -2)`` (how a fresh cache layer stores a prompt)."""
    if cached_keys.op == "call_function" and cached_keys.target in CAT_TARGETS:
        parts = cached_keys.args[0]
        return parts[-1] if isinstance(parts, (list, tuple)) and parts else None
    return None


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


class InsertPrefillCompression:
    """Rewire each prefill site's cache outputs to the outputs of ``kvc::compress_kv``."""

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config
        self.spec = config.to_spec()

    def __call__(self, graph: fx.Graph, sites: list[AttentionSite]) -> int:
        output = graph.output_node()
        prefill_sites = [site for site in sites if site.is_prefill]
        n_layers = len(prefill_sites)
        method = self.config.method_impl
        for site in prefill_sites:
            k_rope = new_key_states(site.cached_keys)
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
                    f"past_key_values=kvc_compile.CompressedCache() (and attn_implementation='kvc')"
                )
            args = (
                site.query, site.cached_keys, site.cached_values, site.mask, cos, sin, site.layer_idx, n_layers,
                self.spec,
            )
            with graph.inserting_after(site.attention):
                compressed = graph.call_function(torch.ops.kvc.compress_kv.default, args)
            items = []
            anchor = compressed
            for index in range(4):
                with graph.inserting_after(anchor):
                    anchor = graph.call_function(operator.getitem, (compressed, index))
                items.append(anchor)
            self._propagate_meta(compressed, items, args)
            output.replace_input_with(site.cached_keys, items[0])
            output.replace_input_with(site.cached_values, items[1])
            if markers is not None:
                output.replace_input_with(markers[0], items[2])
                output.replace_input_with(markers[1], items[3])
        return n_layers

    @staticmethod
    def _propagate_meta(compressed: fx.Node, items: list[fx.Node], args: tuple) -> None:
        """Give the new nodes fake values, as Dynamo and export graphs carry them on every node."""
        fakes = [fake_value(a) if isinstance(a, fx.Node) else a for a in args]
        fake_mode = next(f.fake_mode for f in fakes if isinstance(f, FakeTensor))
        with fake_mode:
            result = torch.ops.kvc.compress_kv.default(*fakes)
        key = "val" if "val" in args[0].meta else "example_value"
        compressed.meta[key] = result
        for index, node in enumerate(items):
            node.meta[key] = result[index]
