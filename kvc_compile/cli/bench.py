"""kvc-bench: prefill time, decode speed and cache memory of plain transformers (full cache), the
kvc-compiled model and a built engine, side by side in one run, reported as ratios and against the
memory-bandwidth bound of a decode step.

    kvc-bench --model smollm2-135m --method snapkv --context 4096 --new-tokens 128 --engine aoti
    kvc-bench --model mistral-7b --weights random --layers 4 --method morphkv --budget 512
    kvc-bench --method snapkv,adakv --compression-ratio 0.5,0.75 --batch 4 --inductor-baseline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvc_compile.bench import provenance_lines, write_report
from kvc_compile.bench.speed import MiB, bench_variants, markdown, size_label
from kvc_compile.cli.common import (
    DTYPES,
    UsageError,
    check_device,
    check_out_dir,
    finite_float,
    parse_options,
    positive_int,
    user_errors,
)
from kvc_compile.config import LOWRANK_METHOD, CompressionConfig
from kvc_compile.models import PRESETS, WEIGHTS, load_model


def bench_options(method: str, compression_ratio: float | None, budget: int | None, items: list[str]) -> dict:
    """The method's options: --option KEY=VALUE items, then the ratio or budget (0.5 when neither is given,
    except for kqsvd alone, which keeps every token)."""
    options = parse_options(items)
    flags = {"method": "--method", "compression_ratio": "--compression-ratio", "budget": "--budget"}
    given = [key for key in flags if key in options]
    if given:
        raise UsageError(f"--option {given[0]}=... : use {flags[given[0]]} instead")
    options = {"method": method, **options}
    if compression_ratio is not None:
        finite_float("--compression-ratio", compression_ratio)
        options["compression_ratio"] = compression_ratio
    elif budget is not None:
        positive_int("--budget", budget)
        options["budget"] = budget
    elif method != LOWRANK_METHOD:
        options["compression_ratio"] = 0.5
    return options


def split_list(flag: str, text: str) -> list[str]:
    """A comma-separated flag value as its non-empty items; none at all is a usage error."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{flag} is empty; give one value or several separated by commas")
    return items


def engine_contexts(text: str | None, engine: str | None, context: int) -> list[int]:
    """``--engine-max-context``: prompt lengths to build engines for, each at least ``--context``."""
    if text is None:
        return []
    if engine is None:
        raise UsageError("--engine-max-context applies to an engine; add --engine aoti (or exported, onnx)")
    lengths = []
    for item in split_list("--engine-max-context", text):
        if not item.isdigit() or int(item) < context:
            raise UsageError(f"--engine-max-context: {item!r} is not a prompt length of at least --context "
                             f"({context}); an engine must take the benchmark's prompt")
        lengths.append(int(item))
    return lengths


def parse_ratios(text: str | None) -> list[float | None]:
    """``--compression-ratio``: one number or several separated by commas ([None]: not given)."""
    if text is None:
        return [None]
    ratios = []
    for item in split_list("--compression-ratio", text):
        try:
            ratio = float(item)
        except ValueError:
            raise UsageError(f"--compression-ratio: {item!r} is not a number; give numbers separated by commas, "
                             f"e.g. 0.5,0.75") from None
        finite_float("--compression-ratio", ratio)
        ratios.append(ratio)
    return ratios


def variant_options(methods: list[str], ratios: list[float | None], budget: int | None,
                    items: list[str]) -> list[dict]:
    """One kvc variant's options per (method, ratio) pair, each checked; the --option items apply to all."""
    variants = []
    for method in methods:
        for ratio in ratios:
            options = bench_options(method, ratio, budget, items)
            CompressionConfig.from_options(options)
            if options in variants:
                raise UsageError(f"{method} at {size_label(options)} is given twice; list each method and ratio once")
            variants.append(options)
    return variants


def _size(variants: list[dict], ratios: list[float | None], budget: int | None) -> str:
    """The kvc variants' size for the report's title."""
    if ratios != [None]:
        return f"at ratio{'s' if len(ratios) > 1 else ''} {', '.join(f'{ratio:g}' for ratio in ratios)}"
    if budget is not None:
        return f"with a budget of {budget}"
    sizes = {f"at {size_label(options)}" if "compression_ratio" in options else "keeping every token"
             for options in variants}
    return " or ".join(sorted(sizes))


@user_errors("kvc-bench")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a preset ({', '.join(PRESETS)}), a checkpoint directory or a Hugging Face id in the "
                             f"local cache")
    parser.add_argument("--method", default="snapkv",
                        help="a method, or several separated by commas (e.g. snapkv,adakv): each (method, ratio) "
                             "pair is one kvc variant, side by side")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--compression-ratio",
                      help="fraction of prompt tokens removed, or several separated by commas (e.g. 0.5,0.75); "
                           "default 0.5 unless --budget is given")
    size.add_argument("--budget", type=int, help="tokens kept per KV head (MorphKV's constant-size cache needs it)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option window_size=32 or --option scorer=tova (repeatable; "
                             "applies to every method given)")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=1, help="prompt rows, decoded together by every variant")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--weights", default="pretrained", choices=WEIGHTS,
                        help="random: a preset's architecture with fresh weights (speed only; no checkpoint needed)")
    parser.add_argument("--layers", type=int, help="with --weights random: keep this many decoder layers")
    parser.add_argument("--inductor-baseline", action="store_true", help="also time Inductor with the full cache")
    parser.add_argument("--engine", choices=("aoti", "exported", "onnx"),
                        help="also build an engine for this target and time it (its warm-up includes the build)")
    parser.add_argument("--engine-max-context", metavar="N[,N...]",
                        help="with --engine: build it for prompts of up to N tokens (default: --context), or one "
                             "engine per N given, side by side (its decode reads only the live entries, so N "
                             "should not change its speed)")
    parser.add_argument("--tune-decode", action="store_true",
                        help="compile decode graphs with Inductor's max-autotune and frozen weights (the kvc option "
                             "tune_decode; the Inductor baseline tunes all its graphs): minutes more compiling, a "
                             "faster decode on the CPU. An --engine aoti gets tuned decode programs too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--bandwidth-mib", type=int,
                        help="size of the streaming read that measures the memory bandwidth (default 512 MiB on "
                             "the CPU, 4096 MiB on CUDA or half the free GPU memory when less is free)")
    parser.add_argument("--out", type=Path, help="write the Markdown result here")
    args = parser.parse_args(argv)

    # Everything the user gave is checked before the model loads.
    methods, ratios = split_list("--method", args.method), parse_ratios(args.compression_ratio)
    variants = variant_options(methods, ratios, args.budget, args.option)
    positive_int("--context", args.context)
    engine_max_contexts = engine_contexts(args.engine_max_context, args.engine, args.context)
    if args.tune_decode and args.engine not in (None, "aoti"):
        raise UsageError(f"--tune-decode tunes what Inductor compiles, and an --engine {args.engine} is not "
                         f"compiled by Inductor; use --engine aoti, or leave out --tune-decode")
    positive_int("--batch", args.batch)
    positive_int("--bandwidth-mib", args.bandwidth_mib)
    positive_int("--new-tokens", args.new_tokens)
    positive_int("--repeats", args.repeats)
    positive_int("--layers", args.layers)
    if args.layers is not None and args.weights != "random":
        raise UsageError("--layers applies to --weights random only (a checkpoint keeps all its layers)")
    if args.weights == "random" and args.model not in PRESETS:
        raise UsageError(f"--weights random builds a preset's architecture; {args.model!r} is not a preset "
                         f"({', '.join(PRESETS)})")
    device = check_device(args.device)
    if args.out is not None:
        if args.out.is_dir():
            raise UsageError(f"--out {args.out} is a folder; give the Markdown file to write")
        check_out_dir(args.out.parent, "--out")  # its folder is created, so a long run cannot fail at the end

    start = time.perf_counter()
    print(f"kvc-bench: loading {args.model} ({args.weights} weights) ...", file=sys.stderr)
    model, _ = load_model(args.model, DTYPES[args.dtype], weights=args.weights, layers=args.layers)
    model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(min(100, vocab - 1), vocab, (args.batch, args.context), generator=generator).to(device)
    bandwidth_bytes = args.bandwidth_mib * MiB if args.bandwidth_mib is not None else None
    results = bench_variants(model, input_ids, variants, args.new_tokens, args.repeats, args.inductor_baseline,
                             args.engine, progress=True, bandwidth_bytes=bandwidth_bytes,
                             engine_max_contexts=engine_max_contexts, tune_decode=args.tune_decode)
    layers = f", {args.layers} layer{'s' if args.layers > 1 else ''}" if args.layers is not None else ""
    rows = f" × {args.batch} rows" if args.batch > 1 else ""
    title = (f"{args.model} ({args.weights} weights{layers}, {args.dtype}, {device}): {args.context}-token prompt"
             f"{rows}, {args.new_tokens} new tokens, {', '.join(methods)} {_size(variants, ratios, args.budget)}"
             f"{', decode graphs tuned (max-autotune, frozen weights)' if args.tune_decode else ''}")
    if len(variants) == 1:
        options_lines = [f"- options: `{json.dumps(variants[0])}`"]
    else:
        options_lines = [f"- options of kvc: {options['method']}, {size_label(options)}: `{json.dumps(options)}`"
                         for options in variants]
    lines = [*markdown(results, title), "", *options_lines, *provenance_lines(time.perf_counter() - start)]
    if args.out:
        write_report(args.out, lines)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
