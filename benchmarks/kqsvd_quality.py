"""KQ-SVD vs K-SVD vs Eigen on SmolLM2-135M: projection errors on held-out activations, and
perplexity of held-out text read through a rank-R cache, with the cache bytes measured.

Calibration and evaluation text both come from Python's own reference text (``pydoc_data.topics``),
split by topic so that nothing evaluated was calibrated on. Perplexity: each held-out sequence is
cut into a context, prefilled by the eager reference and stored at rank R (the tests pin its
tokens to the compiled path's), and a continuation scored teacher-forced on that cache.

    python benchmarks/kqsvd_quality.py --out benchmarks/results/kqsvd-smollm2-cpu.md
"""

from __future__ import annotations

import argparse
import math
import pydoc_data.topics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvc_compile import cache_nbytes, load_model, reference_prefill
from kvc_compile.bench import provenance_lines, write_report
from kvc_compile.eval.calibration import continuation_nll
from kvc_compile.eval.lowrank import calibrate_lowrank, projection_quality
from kvc_compile.methods.kqsvd import LOWRANK_METHODS


def topic_sequences(tokenizer, topics: list[str], length: int, count: int) -> list[torch.Tensor]:
    ids = tokenizer("\n".join(pydoc_data.topics.topics[t] for t in topics), return_tensors="pt").input_ids[0]
    sequences = [ids[i : i + length][None] for i in range(0, len(ids) - length + 1, length)]
    if len(sequences) < count:
        raise SystemExit(f"only {len(sequences)} sequences of {length} tokens in these topics; lower the counts")
    return sequences[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-sequences", type=int, default=8)
    parser.add_argument("--eval-sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--context", type=int, default=768, help="perplexity: context tokens (rest: continuation)")
    parser.add_argument("--error-ranks", default="8,16,32,48")
    parser.add_argument("--ppl-ranks", default="16,32,48")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    topics = sorted(pydoc_data.topics.topics)
    # Every other topic to calibration, the rest held out.
    calibration = topic_sequences(tokenizer, topics[0::2], args.length, args.calibration_sequences)
    heldout = topic_sequences(tokenizer, topics[1::2], args.length, args.eval_sequences)
    error_ranks = [int(r) for r in args.error_ranks.split(",")]
    ppl_ranks = [int(r) for r in args.ppl_ranks.split(",")]
    head_dim = model.config.hidden_size // model.config.num_attention_heads

    errors, perplexity = [], []
    full_nll, full_bytes = [], []
    for ids in heldout:
        context, continuation = ids[:, : args.context], ids[:, args.context :]
        prefill = reference_prefill(model, context, {"method": "snapkv", "compression_ratio": 0.0})
        full_bytes.append(cache_nbytes(prefill.cache))  # before the continuation is appended to it
        full_nll.append(continuation_nll(model, prefill.cache, continuation, args.context).item())
    perplexity.append(("full cache", head_dim, math.exp(sum(full_nll) / len(full_nll)), sum(full_bytes)))
    with tempfile.TemporaryDirectory() as scratch:
        for method in tqdm(LOWRANK_METHODS, desc="methods"):
            projections = calibrate_lowrank(model, calibration, method=method, rank=head_dim)
            errors += [row for ids in heldout[:1] for row in projection_quality(model, projections, ids, error_ranks)]
            path = Path(scratch) / f"{method}.safetensors"
            projections.save(path)
            for rank in ppl_ranks:
                options = {"method": "kqsvd", "projections": str(path), "key_rank": rank, "value_rank": rank}
                nll, nbytes = [], []
                for ids in heldout:
                    context, continuation = ids[:, : args.context], ids[:, args.context :]
                    prefill = reference_prefill(model, context, options)
                    nbytes.append(cache_nbytes(prefill.cache))  # the context's cache, before the continuation
                    nll.append(continuation_nll(model, prefill.cache, continuation, args.context).item())
                perplexity.append((method, rank, math.exp(sum(nll) / len(nll)), sum(nbytes)))

    lines = [
        "# KQ-SVD, K-SVD and Eigen on SmolLM2-135M-Instruct (CPU)",
        "",
        f"Calibration: {args.calibration_sequences} x {args.length} tokens of half of `pydoc_data.topics` "
        f"(every other topic); evaluation: other topics. Keys and queries post-RoPE, GQA groups stacked "
        f"(3 query heads per KV head), values on `V W_O` (KQ-SVD) or `V` (baselines). Ranks out of "
        f"head_dim {head_dim}; the same rank for every layer.",
        "",
        f"## Relative squared Frobenius error on held-out activations ({args.length} tokens, mean over 30 layers)",
        "",
        "| method | rank | K (as queries see it: K A Bᵀ) | KQᵀ | attention output (after o_proj) |",
        "|---|---|---|---|---|",
        *[f"| {r.method} | {r.rank} | {r.keys:.4f} | {r.scores:.4f} | {r.attention_output:.4f} |"
          for r in sorted(errors, key=lambda r: (r.rank, r.method))],
        "",
        f"## Perplexity of held-out continuations read through the cache ({args.eval_sequences} sequences: "
        f"{args.context} context tokens stored at rank R, {args.length - args.context} continuation tokens)",
        "",
        "| cache | rank (keys and values) | perplexity | context cache bytes (measured) | vs full |",
        "|---|---|---|---|---|",
        *[f"| {name} | {rank} | {ppl:.3f} | {nbytes:,} | {nbytes / perplexity[0][3]:.3f} |"
          for name, rank, ppl, nbytes in perplexity],
        "",
        "Cache bytes include each entry's int32 position and head labels (8 bytes per KV head and token), "
        "so a rank-R cache holds slightly more than R/head_dim of the full one.",
        "",
        *provenance_lines(time.perf_counter() - start),
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
