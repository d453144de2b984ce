"""How well Q-Filters predict attention on a real model: per KV head, the rank correlation between a
key's Q-Filters score (its projection on the head's filter) and the attention it actually receives.

The attention a key receives is averaged over the queries that see it (causal), and over the
head's GQA group; the first ``--sinks`` tokens are left out (every head attends to them). The
text is Python's pydoc topics in reverse order, so it is not the default calibration text.

    kvc-calibrate --method qfilters --model smollm2-135m --out smollm2-qfilters.safetensors
    python benchmarks/qfilters_attention.py --filters smollm2-qfilters.safetensors
"""

from __future__ import annotations

import argparse
import pydoc_data.topics

import torch

from kvc_compile.methods.qfilters import QueryFilters
from kvc_compile.models import load_model
from kvc_compile.reference import capture_prefill


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--filters", required=True)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, require_tokenizer=True)
    filters = QueryFilters.load(args.filters)
    text = "\n".join(list(pydoc_data.topics.topics.values())[::-1])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, 5000 : 5000 + args.tokens]
    correlations = []
    for layer, site in enumerate(capture_prefill(model, ids).sites):
        queries, keys = site.query[0].float(), site.keys[0].float()
        kv_heads, n, head_dim = keys.shape
        group = queries.shape[0] // kv_heads
        logits = torch.einsum("hqd,hkd->hqk", queries, keys.repeat_interleave(group, 0)) / head_dim**0.5
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        attention = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        received = attention.sum(1).view(kv_heads, group, n).mean(1) / (n - torch.arange(n))
        scores = torch.einsum("hkd,hd->hk", keys, filters.filters[layer])
        for head in range(kv_heads):
            pair = torch.stack([ranks(scores[head, args.sinks :]), ranks(received[head, args.sinks :])])
            correlations.append(torch.corrcoef(pair)[0, 1].item())
    positive = sum(c > 0 for c in correlations)
    print(f"{args.model}, {ids.shape[1]} tokens: Spearman correlation of the Q-Filters score with the attention "
          f"received, per KV head: mean {sum(correlations) / len(correlations):.3f}, min {min(correlations):.3f}, "
          f"max {max(correlations):.3f}; positive in {positive} of {len(correlations)} heads")


if __name__ == "__main__":
    main()
