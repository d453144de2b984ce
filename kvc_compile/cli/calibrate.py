"""kvc-calibrate: fit KQ-SVD (or K-SVD / Eigen) projections, or Q-Filters, on a model's own activations.

Runs the model on calibration text (your files, or by default the reference text that ships with
Python, ``pydoc_data.topics``), fits per-layer, per-KV-head factors (or filters) and writes them
with safetensors, together with the model's identity. Use a projections file with
``options={"method": "kqsvd", "projections": FILE}`` or ``kqsvd={"projections": FILE}`` next to a
token method, a filters file (``--method qfilters``) with ``options={"method": "qfilters",
"filters": FILE}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvc_compile.cli.common import (
    UsageError,
    check_out_parent,
    finite_float,
    positive_int,
    read_text_file,
    user_errors,
)
from kvc_compile.eval.lowrank import calibrate_lowrank
from kvc_compile.eval.qfilters import calibrate_query_filters
from kvc_compile.methods.kqsvd import LOWRANK_METHODS
from kvc_compile.models import load_model


def calibration_texts(files: list[str]) -> list[str]:
    if files:
        return [read_text_file(f, "--text") for f in files]
    import pydoc_data.topics

    return ["\n".join(pydoc_data.topics.topics.values())]


QFILTERS = "qfilters"


def write_query_filters(model, chunks: list, out: str, console: Console) -> None:
    filters = calibrate_query_filters(model, chunks)
    filters.save(out)
    explained = filters.settings["explained"]
    table = Table(title=f"{out}: share of the query energy along each filter")
    table.add_column("layer", justify="right")
    table.add_column("per KV head", justify="left")
    for layer, shares in enumerate(explained):
        table.add_row(str(layer), "  ".join(f"{share:.2f}" for share in shares))
    console.print(table)


@user_errors("kvc-calibrate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="preset, local directory or cached HF id")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--method", default="kqsvd", choices=(*LOWRANK_METHODS, QFILTERS),
                        help="low-rank projections (kqsvd, ksvd, eigen) or Q-Filters (qfilters)")
    parser.add_argument("--text", nargs="*", default=[], metavar="FILE",
                        help="calibration text files (default: Python's pydoc topics)")
    parser.add_argument("--sequences", type=int, default=8, help="calibration sequences to cut from the text")
    parser.add_argument("--sequence-tokens", type=int, default=1024)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, help="one rank for every layer")
    group.add_argument("--max-error", type=float, default=0.1,
                       help="per-layer rank: smallest whose relative Frobenius error is at most this (default 0.1)")
    args = parser.parse_args(argv)
    console = Console()

    # Everything the user gave is checked before the model loads.
    positive_int("--sequences", args.sequences)
    positive_int("--sequence-tokens", args.sequence_tokens)
    positive_int("--rank", args.rank)
    finite_float("--max-error", args.max_error)
    if args.method == QFILTERS and args.rank is not None:
        raise UsageError("--rank sets the rank of low-rank projections; Q-Filters keep one direction per head, "
                         "drop --rank")
    if not 0 <= args.max_error < 1:
        raise UsageError(f"--max-error must be in [0, 1) (the relative Frobenius error allowed), got {args.max_error}")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; give the .safetensors file to write")
    check_out_parent(args.out)
    if Path(args.out).exists() and not args.force:
        raise UsageError(f"--out {args.out} exists; choose another file or pass --force to replace it")
    texts = calibration_texts(args.text)

    model, tokenizer = load_model(args.model, require_tokenizer=True)
    ids = torch.cat([tokenizer(text, return_tensors="pt").input_ids[0] for text in texts])
    chunks = [ids[i : i + args.sequence_tokens][None] for i in range(0, len(ids), args.sequence_tokens)]
    chunks = [c for c in chunks if c.shape[1] == args.sequence_tokens][: args.sequences]
    if not chunks:
        raise UsageError(f"the text has fewer than {args.sequence_tokens} tokens; give more text or lower "
                         f"--sequence-tokens")
    console.print(f"calibrating {args.method} on {len(chunks)} x {args.sequence_tokens} tokens of {args.model} ...")
    start = time.perf_counter()
    if args.method == QFILTERS:
        write_query_filters(model, chunks, args.out, console)
        console.print(f"done in {time.perf_counter() - start:.1f} s")
        return 0
    projections = calibrate_lowrank(model, chunks, method=args.method, rank=args.rank, max_error=args.max_error)
    projections.save(args.out)
    table = Table(title=f"{args.out}: ranks per layer (head_dim {projections.key_down[0].shape[1]})")
    table.add_column("layer", justify="right")
    table.add_column("key rank", justify="right")
    table.add_column("value rank", justify="right")
    for layer, (key_rank, value_rank) in enumerate(zip(projections.key_ranks, projections.value_ranks, strict=True)):
        table.add_row(str(layer), str(key_rank), str(value_rank))
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
