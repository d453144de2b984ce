"""Check a shared-prefill leaderboard against the compiled path on a slice of its samples.

``kvc-eval --path shared-prefill`` answers every configuration from one reference prefill per
sample. This script answers a slice of the same grid (some methods, ratios, tasks and seeds)
through ``torch.compile(backend="kvc")``, what users run, and compares the predictions with the
leaderboard's recorded ones, sample by sample. ``--inner-backend eager`` runs the kvc pass and its
compression ops without Inductor's code generation, which takes minutes per configuration on a
30-layer model on a CPU.

    python benchmarks/leaderboard_path_check.py --leaderboard benchmarks/results/leaderboard-smollm2 \
        --ratios 0.5 --tasks niah_single --seeds 3 --out benchmarks/results/leaderboard-smollm2-path-check.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kvc_compile import load_model
from kvc_compile.bench import provenance_lines, write_report
from kvc_compile.eval.leaderboard import FULL_CACHE, SHARED_PREFILL, TextTasks, read_records, run_grid
from kvc_compile.methods import list_methods


def read_predictions(cells: Path, filename: str, seeds: int) -> list[str]:
    path = cells / filename
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the leaderboard has no such cell (check --methods/--ratios/--tasks)")
    records = read_records(path)
    if len(records) < seeds:
        raise SystemExit(f"{path} holds {len(records)} samples, fewer than --seeds {seeds}")
    return [record["prediction"] for record in records[:seeds]]


def shown(prediction: str) -> str:
    """A prediction as a table cell: quoted, escapes visible, pipes escaped."""
    return repr(prediction).replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaderboard", type=Path, required=True, help="a kvc-eval --out folder (shared-prefill)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="all", help="comma-separated, or all")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--tasks", default="niah_single")
    parser.add_argument("--seeds", type=int, default=3, help="the first N samples of each cell")
    parser.add_argument("--inner-backend", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    settings = json.loads((args.leaderboard / "settings.json").read_text())
    if settings.get("path") != SHARED_PREFILL:
        raise SystemExit(f"{args.leaderboard} was not made with --path {SHARED_PREFILL} (settings: {settings})")
    methods = list_methods() if args.methods == "all" else args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    tasks = args.tasks.split(",")

    model, tokenizer = load_model(args.model)
    source = TextTasks(tokenizer, settings["context_tokens"], settings["haystack"])

    def compile_model(model, options: dict) -> None:
        model.compile(backend="kvc", options={**options, "inner_backend": args.inner_backend}, dynamic=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        cells = run_grid(model, source, Path(scratch), methods, ratios, tasks, args.seeds,
                         query_aware=settings["query_aware"], path="compiled", compile_model=compile_model,
                         extra_options=settings.get("method_options") or None)
        rows, same, total = [], 0, 0
        for cell in cells:
            compiled = read_predictions(Path(scratch) / "cells", cell.filename, args.seeds)
            shared = read_predictions(args.leaderboard / "cells", cell.filename, args.seeds)
            pairs = list(zip(compiled, shared, strict=True))
            matches = sum(a == b for a, b in pairs)
            same, total = same + matches, total + len(pairs)
            differing = [f"seed {i}: `{shown(a)}` vs `{shown(b)}`" for i, (a, b) in enumerate(pairs) if a != b]
            label = "full cache" if cell.method == FULL_CACHE else cell.method
            rows.append(f"| {label} | {cell.ratio:g} | {cell.task} | {matches}/{len(pairs)} | "
                        f"{'; '.join(differing) or '—'} |")
    wall = time.perf_counter() - start

    lines = [
        f"# Compiled path vs the shared-prefill leaderboard: {args.model}",
        "",
        f"Predictions of `torch.compile(backend=\"kvc\", options={{..., 'inner_backend': '{args.inner_backend}'}})` "
        f"against those recorded in [`{args.leaderboard.name}/`]({args.leaderboard.name}/) by `--path "
        f"{SHARED_PREFILL}`, on the first {args.seeds} samples of each cell "
        f"({settings['haystack']} haystack, {settings['context_tokens']} tokens, "
        f"{'query-aware' if settings['query_aware'] else 'question after compression'}).",
        "",
        f"**{same} of {total} predictions are identical.**",
        "",
        "| method | ratio | task | same prediction | differences (compiled vs shared-prefill) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *provenance_lines(wall),
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
