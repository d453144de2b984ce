"""Compactor: "Compactor: Calibrated KV Cache Compression with Approximate Leverage Scores" (Chari,
Van Durme; arXiv 2507.08143; v1 title "... Calibrated Query-Agnostic KV Cache Compression ...").

Two query-agnostic signals, blended per KV head:

* **Approximate leverage of the pre-RoPE keys.** A key that lies in a direction few other keys
  cover (high statistical leverage ``o_i = x_i^T (X^T X)^{-1} x_i``) cannot be reconstructed from
  the rest, so dropping it loses information no remaining key carries. Keys are un-rotated (RoPE
  would smear the geometry across positions), centred over the row's real tokens, and
  right-sketched with a Gaussian ``Phi`` (``d x sketch_size``, ``N(0, 1/sketch_size)``) so the
  Gram matrix is only ``sketch_size x sketch_size``; ``o_i`` comes from a Cholesky solve with a
  small ridge (raised tenfold on failure).
* **Non-causal chunked attention.** The prompt is cut into chunks of ``chunk_size`` tokens; inside
  a chunk every query attends to every key (no causal mask, no ``1/sqrt(d)`` scale, as in both
  reference implementations), and key ``j`` scores the column sum of those attention weights: how
  much its neighbourhood, before and after it, routes to it. Averaged over the GQA group, scaled
  by ``||v_j||_2`` and smoothed by average pooling (kernel 3), as kvpress does.

The two are z-scored and blended, ``z(attention) + blending * z(leverage)``; the first
``protected_first`` and last ``protected_last`` tokens are always kept.

Defaults and deviations:

* ``sketch_size=48``, ``chunk_size=256``: the paper, kvpress and compactor-vllm (48) agree; vLLM
  uses 128-token attention chunks.
* ``blending=0.3`` is the paper's lambda; kvpress defaults to ``lambda = compression_ratio``
  (a heuristic), compactor-vllm to 0.5.
* ``protected_first=8``, ``protected_last=4`` follow kvpress; the paper's vLLM engine protects the
  first 16 and the last 64 tokens.
* z-scores are taken per batch row over all KV heads and real tokens (vLLM's choice; kvpress pools
  the whole batch), so a row's scores do not depend on what else is in the batch.
* Centring and the sketch cover the whole prompt (kvpress); vLLM centres per 512-token chunk.
* ``Phi`` is drawn once per layer from a CPU generator seeded with ``seed + layer_idx`` and shared
  by the heads and rows of the layer (kvpress draws a fresh one per call and head, vLLM one per
  engine), so runs are reproducible on every device.
* The ridge is 1e-2 as in kvpress (vLLM: 5e-3, with a QR fallback; here a pseudo-inverse is the
  last resort).
* Padding is excluded from centring, from the Gram matrix, from every chunk's softmax and from the
  z-score statistics; chunks and protected tokens are counted from each row's first real token.

While decoding (``decoding_interval``/``target_size``) the queries of evicted tokens are gone, so
the attention signal comes from the ``decoding_window`` most recent tokens (default 256, one chunk;
kvpress's ``DecodingPress`` buffer): their queries form one chunk that reads every cached entry,
non-causally as inside a prefill chunk. The leverage reads every kept key, each un-rotated at its
own logical position (after evictions an entry no longer sits at its index). Protected tokens are
the oldest ``protected_first`` and newest ``protected_last`` entries.

The paper's context-calibrated compression (choosing the ratio from the context's own NLL) is in
``kvc_compile.eval.calibration``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvc_compile.methods.base import (
    PROTECTED,
    ScoreInputs,
    check_decoding_window,
    gqa_mean,
    positions_from_first_valid,
    valid_first_order,
)
from kvc_compile.methods.capabilities import UnrotatesKeys

LEVERAGE_RIDGE = 1e-2
CHOLESKY_TRIES = 5
POOL_KERNEL = 3
# Largest attention block (elements) materialised at once; chunks are processed in groups below it.
ATTENTION_BLOCK_ELEMENTS = 1 << 25


def leverage_scores(x: Tensor, valid: Tensor | None = None, ridge: float = LEVERAGE_RIDGE) -> Tensor:
    """Ridge leverage ``o_i = x_i^T (X^T X + ridge I)^{-1} x_i`` of every row of ``x`` [..., n, k] (fp32).

    Rows where ``valid`` [..., n] is False are left out of ``X^T X`` and score 0. With ``ridge=0`` and
    ``X`` of full column rank this is ``diag(X (X^T X)^{-1} X^T)``. The Gram matrix is factored by
    Cholesky; a matrix that is not numerically positive definite is retried with the ridge raised
    tenfold (``CHOLESKY_TRIES`` times), then a pseudo-inverse is used.
    """
    x = x.float()
    if valid is not None:
        x = x * valid[..., None]
    k = x.shape[-1]
    gram = x.transpose(-1, -2) @ x
    gram = (gram + gram.transpose(-1, -2)) / 2  # exact symmetry for the factorisation
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    # Jitter scale for a zero ridge: relative to the Gram matrix so it means the same at any key scale.
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1.0)
    jitter = torch.full(gram.shape[:-2], float(ridge), dtype=x.dtype, device=x.device)
    for attempt in range(CHOLESKY_TRIES):
        factor, info = torch.linalg.cholesky_ex(gram + jitter[..., None, None] * eye)
        failed = info > 0
        if not failed.any():
            solved = torch.cholesky_solve(x.transpose(-1, -2), factor)  # (G + ridge I)^{-1} X^T, [..., k, n]
            break
        if attempt + 1 < CHOLESKY_TRIES:
            raised = torch.where(jitter > 0, jitter * 10, 1e-6 * scale)
            jitter = torch.where(failed, raised, jitter)
    else:
        solved = torch.linalg.pinv(gram + jitter[..., None, None] * eye, hermitian=True) @ x.transpose(-1, -2)
    return (x * solved.transpose(-1, -2)).sum(dim=-1).clamp_min(0.0)


def gaussian_sketch(rows: int, cols: int, seed: int, device: torch.device) -> Tensor:
    """``Phi`` [rows, cols] with i.i.d. ``N(0, 1/cols)`` entries, drawn on the CPU from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) / math.sqrt(cols)).to(device)


def key_leverage(keys: Tensor, valid: Tensor, sketch: Tensor | None, ridge: float = LEVERAGE_RIDGE) -> Tensor:
    """Approximate leverage [batch, heads, n] of pre-RoPE ``keys`` [batch, heads, n, d].

    Keys are centred over each row's real tokens, then right-sketched by ``sketch`` [d, k] (None: no
    sketch, the exact ridge leverage of the centred keys).
    """
    keys = keys.float()
    mask = valid[:, None, :, None].to(keys.dtype)
    count = mask.sum(dim=2, keepdim=True).clamp_min(1.0)
    centred = (keys - (keys * mask).sum(dim=2, keepdim=True) / count) * mask
    sketched = centred if sketch is None else centred @ sketch.float()
    return leverage_scores(sketched, valid[:, None, :].expand(sketched.shape[:-1]), ridge)


def chunk_attention(queries: Tensor, keys: Tensor, valid: Tensor, chunk_size: int) -> Tensor:
    """Column sums of non-causal attention inside consecutive chunks: [batch, q_heads, n].

    ``queries`` [batch, q_heads, n, d], ``keys`` [batch, kv_heads, n, d] (GQA: query head ``h`` reads
    KV head ``h // group``). Chunk ``c`` holds tokens ``c*chunk_size .. (c+1)*chunk_size - 1`` of the
    sequence; logits are raw ``q . k`` (no scale, no causal mask). Padding keys get no weight and
    padding queries cast no votes. Chunks are cut along the sequence as given; ``Compactor`` moves
    each row's real tokens to the front first so padding does not shift them.
    """
    batch, q_heads, n, head_dim = queries.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    n_chunks = (n + chunk_size - 1) // chunk_size
    pad = n_chunks * chunk_size - n
    q = F.pad(queries.float(), (0, 0, 0, pad)).view(batch, kv_heads, group, n_chunks, chunk_size, head_dim)
    k = F.pad(keys.float(), (0, 0, 0, pad)).view(batch, kv_heads, n_chunks, chunk_size, head_dim)
    live = F.pad(valid, (0, pad), value=False).view(batch, 1, 1, n_chunks, chunk_size)
    step = max(1, ATTENTION_BLOCK_ELEMENTS // (batch * q_heads * chunk_size * chunk_size))
    sums = []
    for start in range(0, n_chunks, step):
        part = slice(start, start + step)
        logits = torch.einsum("bhgcid,bhcjd->bhgcij", q[:, :, :, part], k[:, :, part])
        logits = logits.masked_fill(~live[:, :, :, part, None, :], float("-inf"))
        # A chunk of padding only has no finite logit: where() turns its NaN rows into zero votes.
        weights = torch.where(live[:, :, :, part, :, None], logits.softmax(dim=-1), 0.0)
        sums.append(weights.sum(dim=-2))
    return torch.cat(sums, dim=3).reshape(batch, q_heads, n_chunks * chunk_size)[..., :n]


def recent_attention(queries: Tensor, keys: Tensor, valid: Tensor, voters: Tensor, window: int) -> Tensor:
    """Column sums of the non-causal attention of the last ``window`` query rows over every key,
    averaged over each GQA group: [batch, kv_heads, n] fp32.

    Compactor's chunk attention while decoding: the buffered queries of the newest tokens form one
    chunk that reads the whole cache. Raw ``q . k`` logits (no scale, no causal mask); padding keys get
    no weight and rows where ``voters`` [batch, n] is False cast no vote.
    """
    batch, q_heads, n, _ = queries.shape
    kv_heads = keys.shape[1]
    window = min(window, n)
    grouped = queries[:, :, n - window:].float().view(batch, kv_heads, q_heads // kv_heads, window, -1)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", grouped, keys.float())
    weights = logits.masked_fill(~valid[:, None, None, None, :], float("-inf")).softmax(dim=-1)
    weights = weights * voters[:, None, None, n - window:, None]
    return weights.sum(dim=3).mean(dim=2)


def row_zscore(x: Tensor, valid: Tensor) -> Tensor:
    """z-score [batch, heads, n] over each batch row's real entries (all heads); padding gives 0."""
    mask = valid[:, None, :].expand_as(x).to(x.dtype)
    count = mask.sum(dim=(1, 2), keepdim=True)
    mean = (x * mask).sum(dim=(1, 2), keepdim=True) / count.clamp_min(1.0)
    var = ((x - mean).square() * mask).sum(dim=(1, 2), keepdim=True) / (count - 1).clamp_min(1.0)
    return (x - mean) * mask / var.sqrt().clamp_min(torch.finfo(x.dtype).tiny)


@dataclass(frozen=True)
class Compactor(UnrotatesKeys):
    name = "compactor"
    paper = "arXiv 2507.08143"

    sketch_size: int = 48
    chunk_size: int = 256
    blending: float = 0.3
    protected_first: int = 8
    protected_last: int = 4
    seed: int = 0
    decoding_window: int = 256

    def __post_init__(self) -> None:
        if self.sketch_size <= 0:
            raise ValueError(f"compactor: sketch_size must be a positive integer, got {self.sketch_size}")
        if self.chunk_size <= 0:
            raise ValueError(f"compactor: chunk_size must be a positive integer, got {self.chunk_size}")
        if not (math.isfinite(self.blending) and self.blending >= 0):
            raise ValueError(f"compactor: blending must be a finite number >= 0, got {self.blending}")
        if self.protected_first < 0:
            raise ValueError(f"compactor: protected_first must be an integer >= 0, got {self.protected_first}")
        if self.protected_last < 0:
            raise ValueError(f"compactor: protected_last must be an integer >= 0, got {self.protected_last}")
        check_decoding_window(self.name, self.decoding_window)

    @property
    def decoding_queries(self) -> int:
        return self.decoding_window

    def leverage(self, inputs: ScoreInputs) -> Tensor:
        """Approximate leverage of the pre-RoPE keys, [batch, kv_heads, n]."""
        keys = inputs.unrotate_keys("compactor")
        sketch = gaussian_sketch(keys.shape[-1], self.sketch_size, self.seed + inputs.layer_idx, keys.device)
        return key_leverage(keys, inputs.valid, sketch)

    def attention(self, inputs: ScoreInputs) -> Tensor:
        """Pooled, value-weighted non-causal chunk attention, [batch, kv_heads, n]. While decoding
        (``ScoreInputs.query_valid`` set) the chunk is the newest ``decoding_window`` queries over the
        whole cache (``recent_attention``)."""
        queries, keys, values, valid = inputs.queries, inputs.keys, inputs.values, inputs.valid
        decoding = inputs.query_valid is not None
        columns = recent_attention(queries, keys, valid, inputs.query_valid, self.decoding_window) if decoding else None
        compact = not bool(valid.all())
        if compact:
            # Real tokens first, so chunks and pooling neighbours are counted from the first real token.
            order = valid_first_order(valid)

            def gather(x: Tensor) -> Tensor:
                return x.gather(2, order[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[-1]))

            keys, values, valid = gather(keys), gather(values), valid.gather(1, order)
            if decoding:
                columns = columns.gather(2, order[:, None, :].expand_as(columns))
            else:
                queries = gather(queries)
        if not decoding:
            columns = gqa_mean(chunk_attention(queries, keys, valid, self.chunk_size), keys.shape[1])
        columns = columns * values.float().norm(dim=-1)
        columns = F.avg_pool1d(columns, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
        if compact:
            columns = torch.empty_like(columns).scatter_(-1, order[:, None, :].expand_as(columns), columns)
        return columns

    def score(self, inputs: ScoreInputs) -> Tensor:
        valid = inputs.valid
        scores = row_zscore(self.attention(inputs), valid) + self.blending * row_zscore(self.leverage(inputs), valid)
        position = positions_from_first_valid(valid)
        length = valid.sum(dim=-1, keepdim=True)
        protected = valid & ((position < self.protected_first) | (position >= length - self.protected_last))
        return scores.masked_fill(protected[:, None, :], PROTECTED)
