"""``kvc::compress_kv``: prefill KV compression as one opaque op in the compiled graph.

Inputs are what the attention site already has (post-RoPE queries, the cached keys and values,
the attention mask); the method and budget travel as a canonical string. The fake
implementation gives the kept length as a function of the (possibly symbolic) prompt length, so
the graph stays shape-static with no ``.item()`` and no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvc_compile.config import CompressionConfig
from kvc_compile.methods.base import compress_layer


def valid_keys_from_mask(attn_mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """[batch, n] bool: False where the key is padding.

    Read from the mask row of the last query: with left padding (what generation uses) that query
    is a real token and sees every real key. Boolean masks mark allowed keys with True, additive
    masks with 0 (and the dtype's minimum or -inf elsewhere).
    """
    if attn_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    last_row = attn_mask[:, 0, -1, :n]
    if last_row.dtype != torch.bool:
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    return last_row.expand(batch, n)


@torch.library.custom_op("kvc::compress_kv", mutates_args=())
def compress_kv(
    query: Tensor, keys: Tensor, values: Tensor, attn_mask: Tensor | None, layer_idx: int, spec: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Compress one layer's prefill cache: returns kept keys, kept values, kept indices [b, h, k]."""
    config = CompressionConfig.from_spec(spec)
    batch, _, n, _ = keys.shape
    valid = valid_keys_from_mask(attn_mask, batch, n, keys.device)
    n_kept = config.kept_length(n)
    return compress_layer(config.method_impl, n_kept, query, keys, values, valid, layer_idx)


@compress_kv.register_fake
def _(query: Tensor, keys: Tensor, values: Tensor, attn_mask: Tensor | None, layer_idx: int, spec: str):
    batch, kv_heads, n, _ = keys.shape
    n_kept = CompressionConfig.from_spec(spec).kept_length(n)
    return (
        keys.new_empty(batch, kv_heads, n_kept, keys.shape[-1]),
        values.new_empty(batch, kv_heads, n_kept, values.shape[-1]),
        keys.new_empty(batch, kv_heads, n_kept, dtype=torch.long),
    )
