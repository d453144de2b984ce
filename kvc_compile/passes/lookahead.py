"""Keep the full prompt entries next to the stage-1 cache, for LAQ's second stage
(``KeepPromptEntries``)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from kvc_compile.config import CompressionConfig
from kvc_compile.passes.base import GraphPass, RewriteRecord
from kvc_compile.passes.decode_compression import marker_user


class KeepPromptEntries(GraphPass):
    """Rewire ``kvc::prompt_kv`` of each prefill layer to the layer's uncompressed keys and values.

    Before (a prefill layer of ``CompressedCache``)::

        prompt = kvc.prompt_kv(k_rope, v)                  # nothing kept: empty tensors
        return (..., kept_keys, kept_values, prompt[0], prompt[1], ...)

    After::

        return (..., kept_keys, kept_values, keys, values, ...)   # the uncompressed prompt entries

    The layer then holds both until ``kvc_compile.lookahead`` has rolled out the pseudo tokens on the
    stage-1 cache and re-scored the prompt; peak memory therefore still holds the full prompt, as in
    the paper.
    """

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return config.evicts and config.method_impl.lookahead_queries > 0

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        rewired = 0
        for site in record.prefill_sites:
            marker = marker_user(site.new_keys, torch.ops.kvc.prompt_kv)
            if marker is None:
                continue
            full = {0: site.cached_keys, 1: site.cached_values}
            for item in list(marker.users):
                if item.target is operator.getitem:
                    item.replace_all_uses_with(full[item.args[1]])
                    gm.graph.erase_node(item)
            gm.graph.erase_node(marker)
            rewired += 1
        return rewired
