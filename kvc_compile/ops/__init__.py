"""``torch.library`` custom ops (``kvc::...``) with fake implementations, so Dynamo, AOTAutograd,
Inductor and ``torch.export`` see their output shapes (symbolic in the prompt length, or
data-dependent where a budget comes from the scores).

Each op is a thin registration: it parses its configuration, picks the kernels for its tensors'
device (``ops.kernels.device_kernels``) and calls the pure code of ``kvc_compile.compression`` or a
Triton kernel of ``kvc_compile.plugins.triton``. Importing this package registers every op.
"""

from kvc_compile.ops import decode, kernels
from kvc_compile.ops.compress import (
    compress_kv,
    compress_layers,
    compress_scored_layers,
    compress_site,
    prefill_entries,
    score_kv,
    score_site,
)
from kvc_compile.ops.lowrank import lowrank_factors, lowrank_project

__all__ = [
    "compress_kv",
    "compress_layers",
    "compress_scored_layers",
    "compress_site",
    "decode",
    "kernels",
    "lowrank_factors",
    "lowrank_project",
    "prefill_entries",
    "score_kv",
    "score_site",
]
