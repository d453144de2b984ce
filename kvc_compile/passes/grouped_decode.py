"""Decode attention with native GQA: read each cached entry once, not once per query head."""

from __future__ import annotations

import torch
from torch import fx

from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import SDPA_TARGETS, AttentionSite, fake_value, is_layout_op
from kvc_compile.passes.base import GraphPass, RewriteRecord
from kvc_compile.passes.prefill_compression import propagate_meta

# SDPA's positional parameters after query, key and value.
SDPA_POSITIONAL = ("attn_mask", "dropout_p", "is_causal")


def unrepeated(node: fx.Node, kv_heads: int) -> fx.Node | None:
    """The [batch, kv_heads, T, d] tensor behind ``repeat_kv`` (index, expand, reshape) of ``node``."""
    while is_layout_op(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        value = fake_value(node)
        if value.dim() == 4 and value.shape[1] == kv_heads:
            return node
    return None


class GroupDecodeAttention(GraphPass):
    """Read a dense cache once per decode step: one query token's SDPA over keys and values that
    transformers repeated per query head (``repeat_kv``, its path under an attention mask) becomes an
    SDPA over the cached tensors themselves, with each KV head's query group as that head's query rows.
    The repeat is a copy of the whole cache per step (GQA factor times its bytes), which this removes.

    Before (decode graph, q: [B, H, 1, d], k, v: [B, H_kv, T, d], mask [B, 1, 1, T])::

        k_rep = k[:, :, None].expand(B, H_kv, G, T, d).reshape(B, H, T, d)      # and v_rep
        out = scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)   # [B, H, 1, d]

    After::

        q_grouped = q.unflatten(1, (H_kv, G)).flatten(2, 3)                  # [B, H_kv, G, d]
        grouped = scaled_dot_product_attention(q_grouped, k, v, attn_mask=mask)
        out = grouped.flatten(1, 2).unsqueeze(2)                             # [B, H, 1, d]

    Runs on Dynamo graphs and on the engine programs' export graphs, whose fixed-capacity decode
    attends under a mask.
    """

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return True  # whether a site qualifies depends on the graph

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        return sum(self._group(gm.graph, site) for site in record.decode_sites)

    @staticmethod
    def _group(graph: fx.Graph, site: AttentionSite) -> bool:
        node = site.attention
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            return False
        query, keys, values = node.args[:3]
        # Dynamo graphs pass the options by keyword; export graphs (aten) partly by position.
        options = dict(zip(SDPA_POSITIONAL, node.args[3:], strict=False)) | dict(node.kwargs)
        if options.get("enable_gqa") or options.get("is_causal") or options.get("dropout_p"):
            return False
        q, mask = fake_value(query), options.get("attn_mask")
        kv_heads = int(fake_value(site.cached_keys).shape[1])  # head counts are static
        if not (isinstance(q.shape[2], int) and q.shape[2] == 1) or q.shape[1] == kv_heads:
            return False
        if isinstance(mask, fx.Node) and (fake_value(mask).dim() != 4 or fake_value(mask).shape[1] != 1):
            return False  # a per-head mask has no broadcast over the group's rows
        live_keys, live_values = unrepeated(keys, kv_heads), unrepeated(values, kv_heads)
        if live_keys is None or live_values is None:
            return False
        group = int(q.shape[1]) // kv_heads
        with graph.inserting_before(node):
            split = graph.call_function(torch.unflatten, (query, 1, (kv_heads, group)))
            propagate_meta(split, torch.unflatten, (query, 1, (kv_heads, group)))
            grouped_query = graph.call_function(torch.flatten, (split, 2, 3))
            propagate_meta(grouped_query, torch.flatten, (split, 2, 3))
        node.args = (grouped_query, live_keys, live_values, *node.args[3:])
        fake_args = [fake_value(arg) if isinstance(arg, fx.Node) else arg for arg in node.args]
        fake_kwargs = {key: fake_value(arg) if isinstance(arg, fx.Node) else arg for key, arg in node.kwargs.items()}
        with q.fake_mode:
            grouped = node.target(*fake_args, **fake_kwargs)
        node.meta["val" if "val" in node.meta else "example_value"] = grouped
        with graph.inserting_after(node):
            merged = graph.call_function(torch.flatten, (node, 1, 2))
        propagate_meta(merged, torch.flatten, (node, 1, 2))
        with graph.inserting_after(merged):
            out = graph.call_function(torch.unsqueeze, (merged, 2))
        propagate_meta(out, torch.unsqueeze, (merged, 2))
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not merged)
        return True
