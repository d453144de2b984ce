"""Insert KV compression after every prefill attention site.

Before (one layer of a prefill graph; ``keys``/``values`` are returned, the cache stores them)::

    keys = cat([empty, k_rope], -2); values = cat([empty, v], -2)
    out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
    return (..., keys, values, ...)

After::

    keys = cat([empty, k_rope], -2); values = cat([empty, v], -2)
    out = scaled_dot_product_attention(q_rope, keys, values, attn_mask=mask, enable_gqa=True)
    kept = kvc.compress_kv(q_rope, keys, values, mask, layer_idx, spec)
    return (..., kept[0], kept[1], ...)

Prefill attention itself still reads the full cache; only the cache outputs are rewired, so the
cache object ends up holding the kept tokens. Decode graphs (query length 1) and continuation
chunks (something already cached) are left as they are.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from kvc_compile.config import CompressionConfig
from kvc_compile.ops import compress_kv  # noqa: F401  (registers torch.ops.kvc.compress_kv)
from kvc_compile.passes.attention_sites import AttentionSite, fake_value


class InsertPrefillCompression:
    """Rewire each prefill site's cache outputs to the output of ``kvc::compress_kv``."""

    def __init__(self, config: CompressionConfig) -> None:
        self.spec = config.to_spec()

    def __call__(self, graph: fx.Graph, sites: list[AttentionSite]) -> int:
        output = graph.output_node()
        rewritten = 0
        for site in sites:
            if not site.is_prefill:
                continue
            args = (site.query, site.cached_keys, site.cached_values, site.mask, site.layer_idx, self.spec)
            with graph.inserting_after(site.attention):
                compressed = graph.call_function(torch.ops.kvc.compress_kv.default, args)
            with graph.inserting_after(compressed):
                kept_keys = graph.call_function(operator.getitem, (compressed, 0))
            with graph.inserting_after(kept_keys):
                kept_values = graph.call_function(operator.getitem, (compressed, 1))
            self._propagate_meta(compressed, (kept_keys, kept_values), args)
            output.replace_input_with(site.cached_keys, kept_keys)
            output.replace_input_with(site.cached_values, kept_values)
            rewritten += 1
        return rewritten

    @staticmethod
    def _propagate_meta(compressed: fx.Node, items: tuple[fx.Node, fx.Node], args: tuple) -> None:
        """Give the new nodes fake values, as Dynamo and export graphs carry them on every node."""
        fakes = [fake_value(a) if isinstance(a, fx.Node) else a for a in args]
        fake_mode = next(f.fake_mode for f in fakes if isinstance(f, FakeTensor))
        with fake_mode:
            result = torch.ops.kvc.compress_kv.default(*fakes)
        key = "val" if "val" in args[0].meta else "example_value"
        compressed.meta[key] = result
        for index, node in enumerate(items):
            node.meta[key] = result[index]
