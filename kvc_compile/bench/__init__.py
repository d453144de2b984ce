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


def write_report(path: Path, lines: list[str]) -> None:
    """Write a Markdown result (creating its folder) and echo it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
