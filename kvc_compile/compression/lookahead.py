"""LAQ's second stage on one layer: the prompt entries the buffered queries vote for.

After the pseudo-token rollout (``kvc_compile.lookahead``), each layer holds its full prompt
entries and a buffer of queries: the last ``window_size`` prompt queries, then the rolled-out
pseudo queries. The method scores the prompt with them and the best ``n_kept`` per KV head stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.compression.layout import CompressedKV, keep_dense, prefill_entries
from kvc_compile.methods.base import Method
from kvc_compile.methods.selection import select_uniform


def stage2_entries(method: Method, n_kept, keys: Tensor, values: Tensor, recent_queries: Tensor,
                   prompt_mask: Tensor, pseudo_valid: Tensor) -> CompressedKV:
    """Stage 2 on one layer's full prompt ``keys``/``values``: the entries the buffered queries vote for."""
    batch, kv_heads, n, _ = keys.shape
    valid = prompt_mask.bool()
    # The buffer's first rows are the last window_size prompt queries (zeros before a short prompt).
    padded = F.pad(valid, (method.window_size, 0), value=False)
    voter_valid = torch.cat([padded[:, padded.shape[1] - method.window_size :], pseudo_valid], dim=1)
    if n_kept >= n:
        return CompressedKV(keys, values, *prefill_entries(batch, kv_heads, n, keys.device))
    scores = method.lookahead_scores(keys, valid, recent_queries, voter_valid)
    return keep_dense(keys, values, select_uniform(scores, valid, n_kept))
