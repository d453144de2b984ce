"""kvc-bench: prefill time, decode speed and cache memory of plain transformers (full cache), the
kvc-compiled model and a built engine, side by side in one run, reported as ratios.

    kvc-bench --model smollm2-135m --method snapkv --context 4096 --new-tokens 128 --engine aoti
    kvc-bench --model mistral-7b --weights random --layers 4 --method morphkv --budget 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvc_compile.bench import provenance_lines, write_report
from kvc_compile.bench.speed import bench_variants, markdown
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


@user_errors("kvc-bench")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a preset ({', '.join(PRESETS)}), a checkpoint directory or a Hugging Face id in the "
                             f"local cache")
    parser.add_argument("--method", default="snapkv")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--compression-ratio", type=float,
                      help="fraction of prompt tokens removed (default 0.5 unless --budget is given)")
    size.add_argument("--budget", type=int, help="tokens kept per KV head (MorphKV's constant-size cache needs it)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option window_size=32 or --option scorer=tova (repeatable)")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--weights", default="pretrained", choices=WEIGHTS,
                        help="random: a preset's architecture with fresh weights (speed only; no checkpoint needed)")
    parser.add_argument("--layers", type=int, help="with --weights random: keep this many decoder layers")
    parser.add_argument("--inductor-baseline", action="store_true", help="also time Inductor with the full cache")
    parser.add_argument("--engine", choices=("aoti", "exported", "onnx"),
                        help="also build an engine for this target and time it (its warm-up includes the build)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--out", type=Path, help="write the Markdown result here")
    args = parser.parse_args(argv)

    # Everything the user gave is checked before the model loads.
    options = bench_options(args.method, args.compression_ratio, args.budget, args.option)
    CompressionConfig.from_options(options)
    positive_int("--context", args.context)
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
    input_ids = torch.randint(min(100, vocab - 1), vocab, (1, args.context), generator=generator).to(device)
    results = bench_variants(model, input_ids, options, args.new_tokens, args.repeats, args.inductor_baseline,
                             args.engine, progress=True)
    size = (f"at ratio {options['compression_ratio']}" if "compression_ratio" in options else
            f"with a budget of {options['budget']}" if "budget" in options else "keeping every token")
    layers = f", {args.layers} layer{'s' if args.layers > 1 else ''}" if args.layers is not None else ""
    title = (f"{args.model} ({args.weights} weights{layers}, {args.dtype}, {device}): {args.context}-token prompt, "
             f"{args.new_tokens} new tokens, {args.method} {size}")
    lines = [*markdown(results, title), "", f"- options: `{json.dumps(options)}`",
             *provenance_lines(time.perf_counter() - start)]
    if args.out:
        write_report(args.out, lines)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
