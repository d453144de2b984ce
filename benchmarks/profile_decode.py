"""Where a compiled decode step's time goes: ``torch.profiler`` over a few steps of the kvc-compiled model.

    python benchmarks/profile_decode.py --batch 8 --context 2048 --method snapkv --compression-ratio 0.5
    python benchmarks/profile_decode.py --batch 8 --context 2048 --tune-decode   # decode graphs tuned

Loads the model (a preset or checkpoint, as ``kvc-bench``), compiles it with ``backend="kvc"``,
prefills a random prompt, runs warm-up steps (the in-place cache's first steps compile their own
graphs), times some steps, then prints the profiler's table of ops by their own CPU time.
Inductor's generated C++ kernels (the fused ops, and the GEMMs of a tuned graph) are profiled one by
one (``cpp.enable_kernel_profile``), so they show up by name instead of as one compiled region.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvc_compile import CompressedCache
from kvc_compile.bench.speed import attention_implementation
from kvc_compile.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="snapkv")
    parser.add_argument("--compression-ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--warmup-steps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (as many are timed first)")
    parser.add_argument("--tune-decode", action="store_true", help="the kvc option tune_decode")
    parser.add_argument("--rows", type=int, default=25, help="rows of the profiler's table")
    args = parser.parse_args()
    torch._inductor.config.cpp.enable_kernel_profile = True

    model, _ = load_model(args.model, torch.float32)
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.context),
                        generator=torch.Generator().manual_seed(0))
    options = {"method": args.method, "compression_ratio": args.compression_ratio, "tune_decode": args.tune_decode}
    with attention_implementation(model, "kvc"), torch.no_grad():
        compiled = torch.compile(model, backend="kvc", options=options, dynamic=True)
        cache = CompressedCache()
        token = compiled(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        mask = torch.ones_like(ids)

        def step(token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask = torch.cat([mask, mask.new_ones(args.batch, 1)], dim=-1)
            logits = compiled(token, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            return logits[:, -1:].argmax(-1), mask

        for _ in range(args.warmup_steps):
            token, mask = step(token, mask)
        start = time.perf_counter()
        for _ in range(args.steps):
            token, mask = step(token, mask)
        print(f"{1000 * (time.perf_counter() - start) / args.steps:.1f} ms per step "
              f"({args.batch} rows, {args.context}-token prompt, {args.method} {args.compression_ratio}"
              f"{', decode tuned' if args.tune_decode else ''})")
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(args.steps):
                token, mask = step(token, mask)
    print(f"over {args.steps} steps:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
