"""How fast decode-shaped matrix products read their weights on this CPU, compiled four ways.

    python benchmarks/decode_gemm_cpu.py [--rows 8]
    python benchmarks/decode_gemm_cpu.py --aoti-check

A stack of SmolLM2-sized MLPs (30 x gate, up: 576 -> 1536, down: 1536 -> 576, fp32; 319 MB of
weights, far more than the caches) applied to a few rows, as a decode step applies every layer's
weights. Each way is timed in its own subprocess (Inductor's settings are process-wide), reported as
weight bytes per second: eager (MKL), Inductor's default, Inductor with frozen weights, and
Inductor's max-autotune with frozen weights (what ``tune_decode`` compiles decode graphs with).

``--aoti-check`` compiles the same stack with AOTInductor, frozen weights and max-autotune into a
package, with the weights inside the package's library (AOTInductor's default) and outside it (what
engines use, to share one weights file), then loads and times each in a new process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
from torch import nn

from kvc_compile.backend.tuning import DECODE_TUNING, compile_tuned

# Inductor settings per way, set process-wide before Dynamo traces: Dynamo makes the weights graph
# attributes (which freezing folds) only when ``freezing`` is set while it traces. "compile_tuned" is the
# kvc backend's path, which does that itself.
WAYS = {"eager": None, "inductor": {}, "inductor, frozen weights": {"freezing": True},
        "inductor, max-autotune and frozen weights": DECODE_TUNING, "compile_tuned (tune_decode)": "compile_tuned"}


class MlpStack(nn.Module):
    def __init__(self, layers: int = 30, hidden: int = 576, intermediate: int = 1536) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(hidden, intermediate, bias=False) for _ in range(layers))
        self.ups = nn.ModuleList(nn.Linear(hidden, intermediate, bias=False) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(intermediate, hidden, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for gate, up, down in zip(self.gates, self.ups, self.downs, strict=True):
            x = x + down(nn.functional.silu(gate(x)) * up(x))
        return x


def stack_and_rows(rows: int) -> tuple[MlpStack, torch.Tensor, int]:
    torch.manual_seed(0)
    model = MlpStack().eval()
    return model, torch.randn(rows, 576), sum(p.numel() * p.element_size() for p in model.parameters())


def time_one_way(way: str, rows: int, repeats: int = 20) -> str:
    model, x, weight_bytes = stack_and_rows(rows)
    settings = WAYS[way]
    if settings is None:
        run = model
    elif settings == "compile_tuned":
        run = torch.compile(model, backend=compile_tuned)
    else:
        for key, value in settings.items():
            setattr(torch._inductor.config, key, value)
        run = torch.compile(model)
    with torch.no_grad():
        start = time.perf_counter()
        run(x)
        compile_s = time.perf_counter() - start
        for _ in range(3):
            run(x)
        start = time.perf_counter()
        for _ in range(repeats):
            run(x)
        seconds = (time.perf_counter() - start) / repeats
    return (f"| {way} | {rows} | {seconds * 1e3:.2f} | {weight_bytes / seconds / 1e9:.1f} | {compile_s:.0f} |")


def aoti_check(rows: int, constants_in_so: bool) -> str:
    model, x, weights = stack_and_rows(rows)
    settings = {**DECODE_TUNING, "aot_inductor.package_constants_in_so": constants_in_so}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        exported = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(exported, package_path=f"{folder}/stack.pt2",
                                                         inductor_configs=settings)
        size = sum(info.file_size for info in zipfile.ZipFile(path).infolist())
        code = (f"import time, torch; p = torch._inductor.aoti_load_package({path!r}); x = torch.randn({rows}, 576)\n"
                f"with torch.no_grad():\n    [p(x) for _ in range(3)]; t = time.perf_counter()\n"
                f"    [p(x) for _ in range(20)]\n"
                f"print(f'{{(time.perf_counter() - t) / 20 * 1e3:.2f}} ms per call')")
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return (f"AOTInductor, frozen weights, max-autotune, package_constants_in_so={constants_in_so}: package "
            f"{size:,} bytes for {weights:,} bytes of weights; in a new process: exit status {loaded.returncode}, "
            f"{loaded.stdout.strip() or 'no output'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--way", choices=tuple(WAYS), help=argparse.SUPPRESS)  # one subprocess's part
    parser.add_argument("--aoti-check", action="store_true")
    args = parser.parse_args()
    if args.aoti_check:
        for constants_in_so in (True, False):
            print(aoti_check(args.rows, constants_in_so), flush=True)
    elif args.way is not None:
        print(time_one_way(args.way, args.rows))
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| compiled as | rows | ms | weight GB/s | compile s |\n|---|---|---|---|---|")
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--way", way],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
