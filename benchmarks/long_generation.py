"""Long generations on SmolLM2-135M: how closely constant-size caches follow the full cache.

For each prompt, 200 greedy tokens with the full cache, then with MorphKV and with periodic SnapKV,
Expected Attention, H2O, Compactor, AdaKV and PyramidKV at the same cache size (on average per KV head for the
last two, whose heads or layers keep different counts); reported per cache: the token-level match
rate against the full cache (same token at the same step) and the step of the first difference. Uses the eager reference
path, whose tokens the tests pin equal to the compiled path's.

    python benchmarks/long_generation.py --out benchmarks/results/long-generation-smollm2-cpu.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from kvc_compile import CompressionConfig, load_model, reference_generate
from kvc_compile.bench import provenance_lines, write_report

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain in detail how a compiler turns source code into machine code.",
    "Describe the water cycle step by step, with examples from everyday life.",
    "Write a detailed guide to planning a two-week trip through the mountains.",
    "Tell the history of the printing press and how it changed the world.",
]


def configs(budget: int) -> dict[str, dict]:
    snapkv = {"method": "snapkv", "window_size": 32, "kernel_size": 7, "pooling": "max", "budget": budget}
    return {
        f"morphkv (budget {budget}, w32, sum)": {"method": "morphkv", "budget": budget},
        f"morphkv (budget {budget}, w32, max)": {"method": "morphkv", "budget": budget, "fusion": "max"},
        f"snapkv every step (target {budget})": {**snapkv, "decoding_interval": 1, "target_size": budget},
        f"snapkv every 16 steps (target {budget})": {**snapkv, "decoding_interval": 16, "target_size": budget},
        # Its statistics come from the newest 64 queries while decoding (the target must exceed the window).
        f"expected_attention every 16 steps (target {budget})": {
            "method": "expected_attention", "budget": budget, "decoding_window": 64, "decoding_interval": 16,
            "target_size": budget,
        },
        # Reads every prompt query at prefill; while decoding the newest 64 vote.
        f"h2o every 16 steps (target {budget})": {
            "method": "h2o", "budget": budget, "decoding_window": 64, "decoding_interval": 16, "target_size": budget,
        },
        # The newest 64 queries form one chunk over the cache; keys un-rotated at their positions.
        f"compactor every 16 steps (target {budget})": {
            "method": "compactor", "budget": budget, "decoding_window": 64, "decoding_interval": 16,
            "target_size": budget,
        },
        # Packed layouts: heads share 3 x target entries by score (floor 20 %), or layers share
        # 30 x target in a pyramid; both with SnapKV's window-32 scores.
        f"adakv every 16 steps (target {budget})": {
            "method": "adakv", "budget": budget, "scorer_options": {k: snapkv[k] for k in ("window_size", "kernel_size",
                                                                                            "pooling")},
            "decoding_interval": 16, "target_size": budget,
        },
        f"pyramidkv every 16 steps (target {budget})": {
            **snapkv, "method": "pyramidkv", "decoding_interval": 16, "target_size": budget,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--budget", type=int, default=128, help="entries per KV head the compressed caches keep")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    compressed = configs(args.budget)
    matches = {name: [] for name in compressed}
    first_difference = {name: [] for name in compressed}
    prompt_lengths = []
    start = time.perf_counter()
    for prompt in tqdm(PROMPTS, desc="prompts"):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        prompt_lengths.append(ids.shape[1])
        full = reference_generate(model, ids, {"method": "snapkv", "compression_ratio": 0.0}, args.new_tokens)[0]
        for name, options in compressed.items():
            tokens = reference_generate(model, ids, options, args.new_tokens)[0]
            same = tokens == full
            matches[name].append(same.float().mean().item())
            first_difference[name].append(int((~same).nonzero()[0]) if not same.all() else args.new_tokens)
    pyramid_options = next(options for name, options in compressed.items() if name.startswith("pyramidkv"))
    pyramid_config, n_layers = CompressionConfig.from_options(pyramid_options), model.config.num_hidden_layers
    pyramid = [pyramid_config.layer_decode_target(layer, n_layers) for layer in range(n_layers)]
    rows = [
        f"| {name} | {sum(matches[name]) / len(PROMPTS):.1%} | {', '.join(f'{m:.0%}' for m in matches[name])} | "
        f"{', '.join(map(str, first_difference[name]))} |"
        for name in compressed
    ]
    lines = [
        f"# Long generation, SmolLM2-135M-Instruct: {args.new_tokens} greedy tokens, caches of {args.budget} "
        "entries per KV head vs the full cache",
        "",
        f"{len(PROMPTS)} chat prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens; the full cache ends "
        f"at {min(prompt_lengths) + args.new_tokens}-{max(prompt_lengths) + args.new_tokens} entries. Match rate: "
        "the share of steps whose token equals the full cache's at the same step (after a first difference the "
        "texts usually drift apart, so the first difference is listed too). The compressed caches reach "
        f"{args.budget} entries after {args.budget - max(prompt_lengths)}-{args.budget - min(prompt_lengths)} decoded "
        "tokens; until then they are the full cache. PyramidKV and AdaKV keep that many on average: AdaKV's heads "
        f"share {model.config.num_key_value_heads * args.budget} entries per layer, and PyramidKV's layers keep "
        f"{pyramid[0]} (bottom) down to {pyramid[-1]} (top) per head, so its top layers evict from the first "
        "tokens on.",
        "",
        "| cache | mean match rate | per prompt | first difference (step) |",
        "|---|---|---|---|",
        *rows,
        "",
        *provenance_lines(time.perf_counter() - start),
        f"- prompts: `{json.dumps(PROMPTS)}`",
        f"- options: `{json.dumps(compressed)}`",
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
