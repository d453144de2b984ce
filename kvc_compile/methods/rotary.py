"""Rotary-embedding maths for scorers that read queries or keys before RoPE."""

from __future__ import annotations

import torch
from torch import Tensor


class RotaryNotFoundError(ValueError):
    pass


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate_with(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` rotated back by the tables ``cos``/``sin`` (broadcastable to ``x``), in fp32.

    Tables of YaRN-like RoPE carry an attention scaling ``m`` (``m cos``, ``m sin``): rotating back
    with them scales by ``m`` once more, so divide by ``m^2 = cos^2 + sin^2``.
    """
    x = x.float()
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def rotary_tables_back(cos: Tensor, sin: Tensor, inv_freq: Tensor, steps_back: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary tables (fp32) of the positions ``steps_back`` [batch, heads, count] before a token's.

    ``cos``/``sin`` [batch, 1, q, d] are the tables the newest ``q`` tokens were rotated with (their
    last column is the anchor, at position ``p``) and ``inv_freq`` [d/2] the rotary frequencies
    ``theta_i``. As complex numbers ``c_p = m exp(i p theta_i)``, step ``k`` back is
    ``c_p exp(-i k theta_i)``. Anchoring on the tables the model computed keeps each row's own
    positions (left padding shifts them per row) and the attention scaling ``m``. Returns
    [batch, heads, count, d] each.
    """
    half = cos.shape[-1] // 2
    if inv_freq.numel() != half:
        raise ValueError(f"rotary tables of {cos.shape[-1]} dims need {half} inverse frequencies, got "
                         f"{inv_freq.numel()}: only full-width rotate_half RoPE (Llama, Mistral, Qwen) is supported")
    anchor = torch.complex(cos[:, :, -1:, :half].double(), sin[:, :, -1:, :half].double())
    phases = -steps_back[..., None].to(torch.float64) * inv_freq.to(cos.device, torch.float64)
    table = anchor * torch.polar(torch.ones_like(phases), phases)  # [batch, heads, count, d/2]
    table = torch.cat([table, table], dim=-1)
    return table.real.float(), table.imag.float()


def rotary_tables_before(cos: Tensor, sin: Tensor, inv_freq: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Rotary tables [batch, 1, count, d] (fp32) of the ``count`` positions ending at the newest
    token's (see ``rotary_tables_back``): row ``j`` holds position ``p - (count - 1 - j)``."""
    steps_back = torch.arange(count - 1, -1, -1, device=cos.device).expand(cos.shape[0], 1, count)
    return rotary_tables_back(cos, sin, inv_freq, steps_back)
