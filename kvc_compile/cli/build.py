"""kvc-build: compile a model with its KV-cache compression into an engine directory.

    kvc-build --model smollm2-135m --method snapkv --compression-ratio 0.5 --out engine/
    kvc-build --model mistral-7b --weights random --layers 2 --method obcache --out engine/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console

from kvc_compile.config import LOWRANK_METHOD, CompressionConfig
from kvc_compile.engine import TARGETS, EngineError, build
from kvc_compile.engine.build import check_output_dir
from kvc_compile.models import PRESETS, WEIGHTS, ModelNotFoundError, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_option(item: str) -> tuple[str, object]:
    """KEY=VALUE: an int, a float, a JSON object or list (nested options), else a string."""
    key, sep, value = item.partition("=")
    if not sep:
        raise EngineError(f"--option {item!r} must look like KEY=VALUE, e.g. --option window_size=32")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lstrip().startswith(("{", "[")):
        try:
            return key, json.loads(value)
        except json.JSONDecodeError as error:
            raise EngineError(f"--option {key}: {value!r} is not valid JSON ({error.msg}), e.g. "
                              f"--option 'kqsvd={{\"projections\": \"smollm2.safetensors\"}}'") from error
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-build", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}), a checkpoint directory "
                                                       f"or a Hugging Face id in the local cache")
    parser.add_argument("--weights", default="pretrained", choices=WEIGHTS,
                        help="random: the preset's architecture without its weights (benchmarks, tests)")
    parser.add_argument("--layers", type=int, help="with --weights random: keep this many decoder layers")
    parser.add_argument("--method", required=True)
    ratio = parser.add_mutually_exclusive_group()
    ratio.add_argument("--compression-ratio", type=float, help="fraction of prompt tokens removed")
    ratio.add_argument("--budget", type=int, help="tokens kept per KV head")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option window_size=32 (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--target", default="aoti", choices=TARGETS)
    parser.add_argument("--max-context", type=int, default=2048, help="longest prompt, in tokens")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="decode capacity, in tokens")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        options = {"method": args.method, **dict(parse_option(item) for item in args.option)}
        if args.compression_ratio is not None:
            options["compression_ratio"] = args.compression_ratio
        elif args.budget is not None:
            options["budget"] = args.budget
        elif args.method != LOWRANK_METHOD:  # kqsvd alone keeps every token
            options["compression_ratio"] = 0.5
        config = CompressionConfig.from_options(options)  # bad options fail before the model loads
        if not args.force:  # before a minutes-long model load; build checks again
            check_output_dir(Path(args.out), force=False)
        console.print(f"loading [bold]{args.model}[/bold] ({args.weights} weights) ...")
        model, tokenizer = load_model(args.model, DTYPES[args.dtype], weights=args.weights, layers=args.layers)
        model.to(args.device)
        result = build(model, config, args.out, target=args.target, tokenizer=tokenizer, model_name=args.model,
                       max_context=args.max_context, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                       force=args.force, console=console)
    except (EngineError, ModelNotFoundError, ValueError) as error:
        console.print(f"[red]kvc-build: {error}[/red]")
        return 2
    report(console, result)
    return 0


def report(console: Console, result) -> None:
    manifest = result.manifest
    model = manifest.model
    itemsize = torch.empty(0, dtype=getattr(torch, model["dtype"])).element_size()
    per_entry = 2 * model["head_dim"] * itemsize  # a key and a value
    full = manifest.max_context * model["kv_heads"] * model["layers"] * per_entry
    kept = sum(manifest.budgets["at_max_context"]) * per_entry * (1 if manifest.packed else model["kv_heads"])
    console.print(f"[green]built[/green] {result.out} in {result.seconds:.0f} s ({result.nbytes / 2**20:.1f} MiB): "
                  + ", ".join(entry.file for entry in manifest.programs))
    budget = manifest.budgets["at_max_context"]
    shown = f"{budget[0]}" if len(set(budget)) == 1 else f"{min(budget)}-{max(budget)}"
    unit = "entries per layer (all KV heads)" if manifest.packed else "entries per KV head per layer"
    console.print(f"cache budget at {manifest.max_context} prompt tokens: {shown} {unit}; "
                  f"{full / 2**20:.1f} MiB -> {kept / 2**20:.1f} MiB, "
                  f"{(full - kept) / manifest.max_context:.0f} bytes saved per prompt token")
    evicts = (f" (compressed back to {manifest.decode_target} while decoding)"
              if manifest.decode_target is not None else "")
    console.print(f"decode capacity per layer: {max(manifest.capacity)} slots{evicts}; run it with: kvc-run "
                  f"{result.out} --prompt 'Hello'")


if __name__ == "__main__":
    sys.exit(main())
