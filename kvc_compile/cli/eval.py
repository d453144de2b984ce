"""kvc-eval: a leaderboard of compression methods x ratios x retrieval tasks on one model.

Resumable: finished cells under OUT/cells are never recomputed, and an interrupted cell goes on
from its last recorded sample. Writes OUT/results.json, results.csv, leaderboard.md and
leaderboard.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvc_compile.eval.leaderboard import PATHS, TextTasks, run_grid, summarize
from kvc_compile.eval.retrieval import FIXTURE_MODEL, FIXTURE_OPTIONS, FIXTURE_TASK, PAIRS, FixtureTasks, load_fixture
from kvc_compile.eval.tasks import HAYSTACKS, TASKS
from kvc_compile.methods import list_methods
from kvc_compile.models import load_model

# Tasks SmolLM2-135M answers well above chance with the full cache at 2K tokens of filler
# (benchmarks/results/full-cache-tasks-smollm2-cpu.md: variable_tracking scores 0 there), with
# answers of at most 12 tokens (the multi-needle answers take 48, which triples a grid's decoding).
DEFAULT_TASKS = ("niah_single", "niah_multikey", "passkey")


def parse_list(text: str, valid: list[str] | tuple[str, ...], what: str) -> list[str]:
    items = list(valid) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in valid]
    if unknown:
        raise SystemExit(f"kvc-eval: unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)} (or all)")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a preset, local directory or cached HF id, or {FIXTURE_MODEL} (the shipped "
                             f"retrieval specialist, with its one task {FIXTURE_TASK})")
    parser.add_argument("--methods", default="all", help="comma-separated, or all")
    parser.add_argument("--ratios", default="0.25,0.5,0.75,0.875")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated, or all (default: niah_single,niah_multikey,passkey; "
                             f"{FIXTURE_TASK} for {FIXTURE_MODEL})")
    parser.add_argument("--haystack", default="filler", choices=HAYSTACKS)
    parser.add_argument("--context", type=int, default=2048, help="context tokens per sample")
    parser.add_argument("--samples", type=int, default=50, help="samples per cell (seeds 0..N-1)")
    parser.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    parser.add_argument("--path", default="compiled", choices=PATHS,
                        help="compiled: torch.compile(backend='kvc'), what users run; reference: the eager "
                             "oracle; shared-prefill: one prefill per sample for every configuration, the "
                             "same answers in a fraction of the time on a CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    methods = parse_list(args.methods, list_methods(), "methods")
    fixture = args.model == FIXTURE_MODEL
    valid_tasks = FixtureTasks.tasks if fixture else TASKS
    tasks = parse_list(args.tasks or ",".join(FixtureTasks.tasks if fixture else DEFAULT_TASKS), valid_tasks, "tasks")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise SystemExit(f"kvc-eval: --ratios must be comma-separated numbers in [0, 1), got {args.ratios!r}") from None
    if fixture and args.query_aware:
        raise SystemExit(f"kvc-eval: {FIXTURE_MODEL} answers in one token, which the prefill computes before any "
                         f"compression, so --query-aware would score the full cache; drop --query-aware")
    asked = "query-aware" if args.query_aware else "question after compression"
    if fixture:
        model, source, extra = load_fixture(), FixtureTasks(), FIXTURE_OPTIONS
        title = f"{FIXTURE_MODEL}: {PAIRS}-pair key-value retrieval, {asked}, {args.path} path"
    else:
        model, tokenizer = load_model(args.model)
        source, extra = TextTasks(tokenizer, args.context, args.haystack), None
        title = f"{args.model}: {args.haystack} haystack, {args.context} tokens, {asked}, {args.path} path"
    cells = run_grid(model, source, args.out, methods, ratios, tasks, args.samples,
                     query_aware=args.query_aware, path=args.path, extra_options=extra)
    summarize(args.out, cells, title)
    print((args.out / "leaderboard.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
