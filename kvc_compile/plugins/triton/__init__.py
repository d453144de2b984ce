"""Triton kernels for the hot path, each beside its pure-PyTorch reference.

Triton is optional: on a machine without it (the CPU wheel of torch does not bring it) the
``kvc::`` ops run their references. Tests run the kernels on the CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util
import os

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "kvc: this kernel needs Triton; install it (pip install triton) or use the op, which falls back "
            "to the PyTorch reference"
        )


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # The interpreter multiplies bf16 operands as their raw uint16 bits: upcast them there.
    _INTERPRETED: tl.constexpr = tl.constexpr(interpreting())

    @triton.jit
    def _bf16_pieces_dot(a, b):
        """``a @ b`` for fp32 ``a`` and bf16 ``b``: ``a`` as the sum of three bf16 pieces (8 bits each,
        what is left after them is below 2^-24 of ``a``), each product exact in the fp32 accumulator."""
        high = a.to(tl.bfloat16)
        rest = a - high.to(tl.float32)
        middle = rest.to(tl.bfloat16)
        low = (rest - middle.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(high, b) + tl.dot(middle, b) + tl.dot(low, b)

    @triton.jit
    def exact_dot(a, b):
        """``a @ b`` with fp32 accuracy on tensor cores. fp16/bf16 operands go in as they are: their
        products are exact in the fp32 accumulator. An fp32 operand against a bf16 one is split into
        bf16 pieces; against fp16 or fp32, it goes through three TF32 products (``tf32x3``), which
        fp16 values pass through exactly. (Triton's ``ieee`` fp32 dot runs on FMA units holding whole
        operand rows in registers: at head_dim 128 it spills and runs ~100x slower on an H100.)"""
        if _INTERPRETED:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        if a.dtype == tl.float32:
            if b.dtype == tl.bfloat16:
                return _bf16_pieces_dot(a, b)
            return tl.dot(a, b.to(tl.float32), input_precision="tf32x3")
        if b.dtype == tl.float32:
            if a.dtype == tl.bfloat16:
                return tl.trans(_bf16_pieces_dot(tl.trans(b), tl.trans(a)))
            return tl.dot(a.to(tl.float32), b, input_precision="tf32x3")
        return tl.dot(a, b.to(a.dtype))
