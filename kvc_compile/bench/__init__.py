"""Benchmark helpers: what every recorded result states about where and how it was measured."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
import transformers


def provenance_lines(wall_seconds: float) -> list[str]:
    """Markdown bullet lines: machine, versions, the exact command, the wall time."""
    return [
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- wall time: {wall_seconds:.0f} s",
    ]
