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
