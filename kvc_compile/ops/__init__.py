"""``torch.library`` custom ops (``kvc::...``) with fake implementations, so Dynamo, AOTAutograd,
Inductor and ``torch.export`` see their output shapes (symbolic in the prompt length, or
data-dependent where a budget comes from the scores)."""

from kvc_compile.ops.compress import (
    compress_kv,
    compress_layers,
    compress_scored_layers,
    compress_site,
    prefill_entries,
    score_kv,
    score_site,
    valid_keys_from_mask,
)
from kvc_compile.ops.lowrank import lowrank_factors, lowrank_project

__all__ = [
    "compress_kv",
    "compress_layers",
    "compress_scored_layers",
    "compress_site",
    "lowrank_factors",
    "lowrank_project",
    "prefill_entries",
    "score_kv",
    "score_site",
    "valid_keys_from_mask",
]
