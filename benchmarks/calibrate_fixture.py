"""Q-Filters and KQ-SVD projections of the retrieval fixture, for its leaderboard.

The fixture has no text tokenizer, so it is calibrated on its own kind of prompt: key-value contexts
(``BOS k1 v1 ... k8 v8 SEP``) drawn from seeds the leaderboard never uses (10000 onwards; its samples
are seeds 0..N-1).

    python benchmarks/calibrate_fixture.py --out benchmarks/results/leaderboard-retrieval-fixture
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvc_compile.eval.lowrank import calibrate_lowrank
from kvc_compile.eval.qfilters import calibrate_query_filters
from kvc_compile.eval.retrieval import load_fixture, retrieval_batch

FIRST_SEED = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the two .safetensors files")
    parser.add_argument("--contexts", type=int, default=256)
    args = parser.parse_args()
    model = load_fixture()
    contexts = [retrieval_batch(1, torch.Generator().manual_seed(FIRST_SEED + i))[0] for i in range(args.contexts)]
    calibrate_query_filters(model, contexts).save(args.out / "fixture-qfilters.safetensors")
    calibrate_lowrank(model, contexts).save(args.out / "fixture-kqsvd.safetensors")
    print(f"wrote {args.out}/fixture-qfilters.safetensors and fixture-kqsvd.safetensors from {len(contexts)} contexts")


if __name__ == "__main__":
    main()
