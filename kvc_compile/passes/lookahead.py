"""Keep the full prompt entries next to the stage-1 cache, for LAQ's second stage.

Before (a prefill layer of ``CompressedCache``)::

    prompt = kvc.prompt_kv(k_rope, v)                  # nothing kept: empty tensors
    return (..., kept_keys, kept_values, prompt[0], prompt[1], ...)

After::

    return (..., kept_keys, kept_values, keys, values, ...)   # the uncompressed prompt entries

The layer then holds both until ``kvc_compile.lookahead`` has rolled out the pseudo tokens on the
stage-1 cache and re-scored the prompt; peak memory therefore still holds the full prompt, as in
the paper.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import AttentionSite
from kvc_compile.passes.decode_compression import marker_user


class KeepPromptEntries:
    """Rewire ``kvc::prompt_kv`` of each prefill layer to the layer's uncompressed keys and values."""

    def __init__(self, config: CompressionConfig) -> None:
        self.wanted = config.evicts and config.method_impl.lookahead_queries > 0

    def __call__(self, gm: fx.GraphModule, sites: list[AttentionSite]) -> int:
        if not self.wanted:
            return 0
        rewired = 0
        for site in sites:
            marker = marker_user(site.new_keys, torch.ops.kvc.prompt_kv) if site.is_prefill else None
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
