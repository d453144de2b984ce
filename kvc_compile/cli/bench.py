"""kvc-bench: prefill time, decode speed and cache memory of plain transformers (full cache), the
kvc-compiled model and a built engine, side by side in one run, reported as ratios.

    kvc-bench --model smollm2-135m --method snapkv --context 4096 --new-tokens 128 --engine aoti
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvc_compile.bench import provenance_lines, write_report
from kvc_compile.bench.speed import bench_variants, markdown
from kvc_compile.config import CompressionConfig
from kvc_compile.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="snapkv")
    parser.add_argument("--compression-ratio", type=float, default=0.5)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option window_size=32 (repeatable)")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--weights", default="pretrained", choices=("pretrained", "random"),
                        help="random: the architecture with fresh weights (speed only)")
    parser.add_argument("--inductor-baseline", action="store_true", help="also time Inductor with the full cache")
    parser.add_argument("--engine", choices=("aoti", "exported", "onnx"),
                        help="also build an engine for this target and time it (its warm-up includes the build)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", type=Path, help="write the Markdown result here")
    args = parser.parse_args(argv)

    options = {"method": args.method, "compression_ratio": args.compression_ratio}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "-0123456789[{tf" else value
    CompressionConfig.from_options(options)  # bad options fail before anything loads
    start = time.perf_counter()
    model, _ = load_model(args.model)
    if args.weights == "random":
        torch.manual_seed(0)
        model = type(model)(model.config).eval()
    model = model.to(args.device, getattr(torch, args.dtype))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, model.config.vocab_size, (1, args.context), generator=generator).to(args.device)
    results = bench_variants(model, input_ids, options, args.new_tokens, args.repeats, args.inductor_baseline,
                             args.engine)
    title = (f"{args.model} ({args.weights} weights, {args.dtype}, {args.device}): {args.context}-token prompt, "
             f"{args.new_tokens} new tokens, {args.method} at ratio {args.compression_ratio}")
    lines = [*markdown(results, title), "", f"- options: `{json.dumps(options)}`",
             *provenance_lines(time.perf_counter() - start)]
    if args.out:
        write_report(args.out, lines)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
