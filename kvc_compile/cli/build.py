"""kvc-build: compile a model with its KV-cache compression into an engine directory.

    kvc-build --model smollm2-135m --method snapkv --compression-ratio 0.5 --out engine/
    kvc-build --model mistral-7b --weights random --layers 2 --method obcache --out engine/
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from rich.console import Console

from kvc_compile.cli.common import DTYPES, check_device, check_out_parent, parse_option, positive_int, user_errors
from kvc_compile.config import LOWRANK_METHOD, CompressionConfig
from kvc_compile.engine import TARGETS, build
from kvc_compile.engine.build import check_build_request, check_output_dir
from kvc_compile.models import PRESETS, WEIGHTS, load_model, preset_config


def _local_model_dir(model: str) -> Path | None:
    """``--model`` as the checkpoint folder it names, when it is one (a preset name is not)."""
    if model in PRESETS or not Path(model).exists():
        return None
    path = Path(model).resolve()
    return path if path.is_dir() else path.parent


def _max_positions(model: str, weights: str, layers: int | None) -> int | None:
    """The model's position limit from its configuration alone, when that is cheap to read."""
    try:
        if model in PRESETS:
            config = preset_config(model, layers=layers if weights == "random" else None)
        elif _local_model_dir(model) is not None and (Path(model) / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model)
        else:
            return None
    except Exception:  # the model load reports a broken configuration with the right message
        return None
    return getattr(config, "max_position_embeddings", None)


@user_errors("kvc-build")
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
    parser.add_argument("--force", action="store_true",
                        help="replace the engine directory at --out (never a folder of other files)")
    parser.add_argument("--target", default="aoti", choices=TARGETS)
    parser.add_argument("--max-context", type=int, default=2048, help="longest prompt, in tokens")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="decode capacity, in tokens")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tune-decode", action="store_true",
                        help="compile the decode programs with Inductor's max-autotune and frozen weights (--target "
                             "aoti): faster decode steps, for minutes more compiling and one more copy of the "
                             "weights, carried in the decode program")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    # Everything that can be refused is refused before the model loads (minutes for a large one).
    device = check_device(args.device)
    check_out_parent(args.out)
    positive_int("--layers", args.layers)
    options = {"method": args.method, **dict(parse_option(item) for item in args.option)}
    if args.tune_decode:
        options["tune_decode"] = True
    if args.compression_ratio is not None:
        options["compression_ratio"] = args.compression_ratio
    elif args.budget is not None:
        options["budget"] = args.budget
    elif args.method != LOWRANK_METHOD:  # kqsvd alone keeps every token
        options["compression_ratio"] = 0.5
    config = CompressionConfig.from_options(options)
    check_build_request(config, target=args.target, dtype=DTYPES[args.dtype], max_context=args.max_context,
                        max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                        max_positions=_max_positions(args.model, args.weights, args.layers))
    model_dir = _local_model_dir(args.model)
    check_output_dir(args.out, args.force, [model_dir] if model_dir is not None else [])  # build checks again
    console.print(f"loading [bold]{args.model}[/bold] ({args.weights} weights) ...")
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], weights=args.weights, layers=args.layers)
    model.to(device)
    result = build(model, config, args.out, target=args.target, tokenizer=tokenizer, model_name=args.model,
                   max_context=args.max_context, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                   force=args.force, console=console)
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
    tuned = " (tuned: max-autotune, frozen weights)" if manifest.tuned_decode else ""
    console.print(f"decode capacity per layer: {max(manifest.capacity)} slots{evicts}{tuned}; run it with: "
                  f"{run_command(result.out, manifest)}", markup=False)


def run_command(out, manifest) -> str:
    """The kvc-run line that works for this engine: token ids without a tokenizer, trust for exported."""
    trust = " --trust-engine" if manifest.target == "exported" else ""
    prompt = "--prompt 'Hello'" if manifest.tokenizer is not None else "--token-ids '1 2 3'"
    return f"kvc-run {shlex.quote(str(out))}{trust} {prompt}"


__all__ = ["main", "parse_option", "report"]


if __name__ == "__main__":
    sys.exit(main())
