"""kvc-eval: a leaderboard of compression methods x ratios x retrieval tasks on one model.

Resumable: finished cells under OUT/cells are never recomputed, and an interrupted cell goes on
from its last recorded sample. OUT/settings.json records the model and the settings that make a
cell, and a folder made with others is refused rather than mixed. Writes OUT/results.json,
results.csv, leaderboard.md and leaderboard.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from kvc_compile.cli.common import UsageError, check_out_dir, parse_option, positive_int, user_errors
from kvc_compile.eval.leaderboard import PATHS, TextTasks, check_resume, run_grid, summarize
from kvc_compile.eval.retrieval import FIXTURE_MODEL, FIXTURE_OPTIONS, FIXTURE_TASK, PAIRS, FixtureTasks, load_fixture
from kvc_compile.eval.tasks import HAYSTACKS, TASKS
from kvc_compile.methods import list_methods
from kvc_compile.models import load_model

# Tasks SmolLM2-135M answers well above chance with the full cache at 2K tokens of filler
# (benchmarks/results/full-cache-tasks-smollm2-cpu.md: variable_tracking scores 0 there), with
# answers of at most 12 tokens (the multi-needle answers take 48, which triples a grid's decoding).
DEFAULT_TASKS = ("niah_single", "niah_multikey", "passkey")
DEFAULT_CONTEXT = 2048
DEFAULT_HAYSTACK = "filler"


def parse_list(text: str, valid: list[str] | tuple[str, ...], what: str) -> list[str]:
    items = list(valid) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in valid]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)} (or all)")
    if not items:
        raise UsageError(f"--{what} is empty; give a comma-separated list of {', '.join(valid)}, or all")
    return list(dict.fromkeys(items))  # a repeated name would record its cells twice


def parse_ratios(text: str) -> list[float]:
    """Comma-separated compression ratios, each a finite number in [0, 1)."""
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}") from None
    bad = [r for r in ratios if not (math.isfinite(r) and 0 <= r < 1)]
    if bad or not ratios:
        shown = f"got {', '.join(f'{r:g}' for r in bad)}" if bad else "got none"
        raise UsageError(f"--ratios must be finite numbers in [0, 1) (the fraction of tokens removed), {shown}; "
                         f"e.g. --ratios 0.25,0.5,0.75")
    return list(dict.fromkeys(ratios))


def model_settings(name: str) -> dict:
    """What names the model in a results folder: a local checkpoint by its absolute path."""
    path = Path(name).expanduser()
    return {"name": str(path.resolve()) if path.is_dir() else name, "weights": "pretrained"}


def method_options_given(items: list[str], methods: list[str], base: dict[str, dict]) -> dict[str, dict]:
    """``base`` with each ``METHOD:KEY=VALUE`` of ``--method-option`` added to its method's options."""
    options = {method: dict(values) for method, values in base.items()}
    for item in items:
        method, sep, option = item.partition(":")
        if not sep or not method:
            raise UsageError(f"--method-option {item!r} must look like METHOD:KEY=VALUE, e.g. "
                             f"--method-option qfilters:filters=smollm2-qfilters.safetensors")
        if method not in methods:
            raise UsageError(f"--method-option {item!r}: {method!r} is not among --methods ({', '.join(methods)})")
        key, value = parse_option(option)
        options.setdefault(method, {})[key] = value
    return options


@user_errors("kvc-eval")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a preset, local directory or cached HF id, or {FIXTURE_MODEL} (the shipped "
                             f"retrieval specialist, with its one task {FIXTURE_TASK})")
    parser.add_argument("--methods", default="all", help="comma-separated, or all")
    parser.add_argument("--ratios", default="0.25,0.5,0.75,0.875",
                        help="comma-separated compression ratios in [0, 1) (fraction of tokens removed)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated, or all (default: niah_single,niah_multikey,passkey; "
                             f"{FIXTURE_TASK} for {FIXTURE_MODEL})")
    parser.add_argument("--haystack", default=None, choices=HAYSTACKS, help=f"default: {DEFAULT_HAYSTACK}")
    parser.add_argument("--context", type=int, default=None,
                        help=f"context tokens per sample (default: {DEFAULT_CONTEXT})")
    parser.add_argument("--samples", type=int, default=50, help="samples per cell (seeds 0..N-1)")
    parser.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    parser.add_argument("--path", default="compiled", choices=PATHS,
                        help="compiled: torch.compile(backend='kvc'), what users run; reference: the eager "
                             "oracle; shared-prefill: one prefill per sample for every configuration, the "
                             "same answers in a fraction of the time on a CPU")
    parser.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="an option of one method, e.g. --method-option qfilters:filters=FILE (repeatable); "
                             "recorded in the results folder's settings")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    # Everything the user gave is checked before the model loads.
    methods = parse_list(args.methods, list_methods(), "methods")
    fixture = args.model == FIXTURE_MODEL
    valid_tasks = FixtureTasks.tasks if fixture else TASKS
    tasks = parse_list(args.tasks or ",".join(FixtureTasks.tasks if fixture else DEFAULT_TASKS), valid_tasks, "tasks")
    ratios = parse_ratios(args.ratios)
    positive_int("--samples", args.samples)
    positive_int("--context", args.context)
    check_out_dir(args.out)
    if fixture:
        if args.query_aware:
            raise UsageError(f"{FIXTURE_MODEL} answers in one token, which the prefill computes before any "
                             f"compression, so --query-aware would score the full cache; drop --query-aware")
        given = [flag for flag, value in (("--context", args.context), ("--haystack", args.haystack)) if value]
        if given:
            raise UsageError(f"{FIXTURE_MODEL}'s prompts are {FixtureTasks.context_tokens} tokens of key-value pairs; "
                             f"drop {' and '.join(given)}")
    context, haystack = args.context or DEFAULT_CONTEXT, args.haystack or DEFAULT_HAYSTACK
    asked = "query-aware" if args.query_aware else "question after compression"
    identity = model_settings(args.model)
    task_settings = FixtureTasks().settings if fixture else TextTasks(None, context, haystack).settings
    extra = method_options_given(args.method_option, methods, FIXTURE_OPTIONS if fixture else {}) or None
    # A folder made with other settings is refused now, not after a model load of minutes.
    check_resume(args.out, {**task_settings, "model": identity, "method_options": extra or {},
                            "query_aware": args.query_aware, "path": args.path})

    if fixture:
        model, source = load_fixture(), FixtureTasks()
        title = f"{FIXTURE_MODEL}: {PAIRS}-pair key-value retrieval, {asked}, {args.path} path"
    else:
        model, tokenizer = load_model(args.model, require_tokenizer=True)
        source = TextTasks(tokenizer, context, haystack)
        title = f"{args.model}: {haystack} haystack, {context} tokens, {asked}, {args.path} path"
    cells = run_grid(model, source, args.out, methods, ratios, tasks, args.samples, query_aware=args.query_aware,
                     path=args.path, extra_options=extra, model_settings=identity)
    summarize(args.out, cells, title)
    print((args.out / "leaderboard.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
