"""Faster implementations of the scorers' shared maths, chosen per call by the op that runs them.

A scorer always calls the pure-PyTorch reference through ``ScoreInputs`` and the selection
helpers; an op whose tensors sit on a GPU hands in the Triton kernels for the duration of its call
(``using_kernels``, ``kvc_compile.ops.kernels.device_kernels``). Nothing is decided at import time,
so the same code gives the same result whatever was imported first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Kernels:
    """Stand-ins for the references (None: use the reference)."""

    # (queries, keys, valid, window) -> [batch, q_heads, n] fp32: ``scoring.window_votes``.
    window_votes: Callable[[Tensor, Tensor, Tensor, int], Tensor] | None = None
    # (queries, keys, values, valid, window, variant) -> [batch, q_heads, n] fp32: ``scoring.window_output_saliency``.
    output_saliency: Callable[[Tensor, Tensor, Tensor, Tensor, int, str], Tensor] | None = None
    # (masked scores, keys, values, k) -> kept keys, values, positions: uniform selection and gather in one.
    select_and_gather: Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]] | None = None
    # (scores, k) -> positions: ``selection.top_positions``.
    top_positions: Callable[[Tensor, int], Tensor] | None = None


REFERENCE = Kernels()
_ACTIVE: ContextVar[Kernels] = ContextVar("kvc_kernels", default=REFERENCE)


def active_kernels() -> Kernels:
    """The kernels of the op now running (``REFERENCE`` outside any)."""
    return _ACTIVE.get()


@contextmanager
def using_kernels(kernels: Kernels) -> Iterator[None]:
    """Run the enclosed scoring and selection with ``kernels``."""
    token = _ACTIVE.set(kernels)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
