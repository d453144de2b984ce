"""ExpectedAttention: "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution" (Devoto, Jeblick, Jégou; arXiv 2510.00636, the kvpress paper).

Eviction should follow the attention of the queries still to come, which are unknown at prefill.
They are modelled as a Gaussian: mean ``mu`` and covariance ``Sigma`` of the prompt's pre-RoPE
queries (per query head, the first ``n_sink`` tokens left out as outliers), moved to the coming
positions by the RoPE rotation averaged over the next ``n_future_positions`` positions:
``mu' = R mu``, ``Sigma' = R Sigma R^T`` with ``R = mean_t R_{p+t}``. For a Gaussian ``q``,
``E[exp(q.k / sqrt(d))] = exp(mu'.k / sqrt(d) + k^T Sigma' k / (2d))``, so that exponent is each
key's expected logit; its softmax over the keys is the expected attention, averaged over the GQA
group and, with ``use_vnorm``, rescaled to ``(s + epsilon) * ||v||_2`` since a token's contribution
to the output also grows with its value. Sinks are always kept.

Defaults are kvpress's ``ExpectedAttentionPress`` (``n_future_positions=512, n_sink=4,
use_covariance=True, use_vnorm=True, epsilon=0``; kvpress's registry entry ``expected_attention``
wraps it in AdaKV with ``epsilon=1e-2``). Differences from kvpress: the statistics come from the
layer's actual queries (``unrotate``), so a q-projection bias and Qwen3's q-norm are included (kvpress
projects the hidden states with the q weight alone and refuses q-norm models); sinks are counted
from each row's first real token and padding is left out of the statistics and the softmax; the
future rotation is derived from the rotary tables the keys were rotated with (below) rather than
by calling the model's rotary module at positions ``n .. n + T - 1``.

Rotary tables: transformers' RoPE pairs dimension ``i`` with ``i + d/2``, and at position ``p`` the
tables hold ``m cos(p theta_i)`` and ``m sin(p theta_i)`` (``m``: the attention scaling of YaRN-like
schemes, 1 for most models). As complex numbers ``c_p = m exp(i p theta_i)``, the one-step rotation
``exp(i theta_i)`` is ``c_p / c_{p-1}`` at the last two real positions, and the mean future rotation
is ``c_last * mean_{t=1..T} exp(i t theta_i)``: it carries ``m`` once, as the real future queries will.

While decoding (``decoding_interval``/``target_size``), the statistics come from the queries of the
``decoding_window`` most recent tokens (kvpress's ``DecodingPress`` scores from a buffer of the last
256 hidden states), un-rotated with tables counted back from the newest token's, and the future
rotation starts at the newest token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvc_compile.methods.base import PROTECTED, ScoreInputs, check_decoding_window, positions_from_first_valid
from kvc_compile.methods.capabilities import PreRopeScorer
from kvc_compile.methods.rotary import rotate_half


def mean_future_rotation(cos: Tensor, sin: Tensor, valid: Tensor, n_future: int) -> Tensor:
    """Mean rotation over the ``n_future`` positions after each row's last real token.

    ``cos``/``sin`` broadcastable to [batch, 1, n, d]. Returns [batch, d/2] complex128: the factor that
    multiplies the pair ``x_i + 1j * x_{i + d/2}``.
    """
    batch, n = valid.shape
    half = cos.shape[-1] // 2
    table = torch.complex(
        cos.expand(batch, 1, n, -1)[:, 0, :, :half].double(),
        sin.expand(batch, 1, n, -1)[:, 0, :, :half].double(),
    )
    index = torch.arange(n, device=valid.device)
    last = torch.where(valid, index, -1).amax(dim=-1).clamp(min=0)
    before = torch.where(valid & (index < last[:, None]), index, -1).amax(dim=-1)
    rows = torch.arange(batch, device=valid.device)
    ratio = table[rows, last] / table[rows, before.clamp(min=0)]
    # A row with one real token has one key to rank: any step will do, take none.
    ratio = torch.where(before[:, None] >= 0, ratio, torch.ones_like(ratio))
    theta = ratio.angle()[:, None]  # [batch, 1, d/2]; float64 keeps t * theta accurate up to t = n_future
    phases = torch.arange(1, n_future + 1, device=valid.device, dtype=torch.float64)[:, None] * theta
    mean_step = torch.polar(torch.ones_like(phases), phases).mean(dim=1)
    return table[rows, last] * mean_step


def rotation_matrix(rotation: Tensor) -> Tensor:
    """[batch, d, d] real matrix of the per-pair complex factors ``rotation`` [batch, d/2]."""
    a = torch.cat([rotation.real, rotation.real], dim=-1).float()
    b = torch.cat([rotation.imag, rotation.imag], dim=-1).float()
    eye = torch.eye(a.shape[-1], device=a.device)
    # Row c is R e_c = e_c * a + rotate_half(e_c) * b (how RoPE applies cos/sin), i.e. column c of R.
    return (eye[None] * a[:, None, :] + rotate_half(eye)[None] * b[:, None, :]).transpose(-1, -2)


@dataclass(frozen=True)
class ExpectedAttention(PreRopeScorer):
    name = "expected_attention"
    paper = "arXiv 2510.00636"

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    decoding_window: int = 256

    def __post_init__(self) -> None:
        if self.n_future_positions < 1:
            raise ValueError(
                f"{self.name}: n_future_positions must be a positive integer, got {self.n_future_positions}"
            )
        if self.n_sink < 0:
            raise ValueError(f"{self.name}: n_sink must be an integer >= 0, got {self.n_sink}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"{self.name}: epsilon must be a finite number >= 0, got {self.epsilon}")
        check_decoding_window(self.name, self.decoding_window, minimum=2)  # a covariance needs two

    @property
    def decoding_queries(self) -> int:
        return self.decoding_window

    def query_statistics(self, inputs: ScoreInputs) -> tuple[Tensor, Tensor | None]:
        """Mean [batch, q_heads, d] and covariance [batch, q_heads, d, d] of the future queries (fp32)."""
        pre_rope = inputs.unrotate(inputs.queries, self.name)
        if inputs.query_valid is None:
            used = inputs.valid & (positions_from_first_valid(inputs.valid) >= self.n_sink)
        else:  # while decoding: the recent tokens' queries, long past the sinks
            used = inputs.query_valid
        weight = used[:, None, :, None].float()
        count = used.sum(dim=-1).clamp(min=1)[:, None, None].float()  # an empty row gives mean 0, not NaN
        mean = (pre_rope * weight).sum(dim=2) / count
        rotation = rotation_matrix(mean_future_rotation(inputs.cos, inputs.sin, inputs.valid, self.n_future_positions))
        future_mean = torch.einsum("bij,bhj->bhi", rotation, mean)
        if not self.use_covariance:
            return future_mean, None
        centred = (pre_rope - mean[:, :, None]) * weight
        cov = centred.transpose(-1, -2) @ centred / count[..., None]  # population covariance, as kvpress
        return future_mean, rotation[:, None] @ cov @ rotation[:, None].transpose(-1, -2)

    def score(self, inputs: ScoreInputs) -> Tensor:
        keys, valid = inputs.keys.float(), inputs.valid
        batch, kv_heads, n, head_dim = keys.shape
        mean, cov = self.query_statistics(inputs)
        group = mean.shape[1] // kv_heads
        mean = mean.view(batch, kv_heads, group, head_dim)
        logits = torch.einsum("bhgd,bhnd->bhgn", mean, keys) / math.sqrt(head_dim)
        if cov is not None:
            cov = cov.view(batch, kv_heads, group, head_dim, head_dim)
            for g in range(group):  # one [batch, kv_heads, n, d] product at a time
                spread = ((keys @ cov[:, :, g]) * keys).sum(dim=-1)
                logits[:, :, g] += spread / (2 * head_dim)
        sink = valid & (positions_from_first_valid(valid) < self.n_sink)
        candidates = (valid & ~sink)[:, None, None, :]
        # A row made only of sinks and padding has nothing to rank: its 0/0 softmax becomes 0.
        scores = logits.masked_fill(~candidates, float("-inf")).softmax(dim=-1).nan_to_num(nan=0.0)
        scores = scores.mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * inputs.values.float().norm(dim=-1)
        return scores.masked_fill(sink[:, None, :], PROTECTED)

