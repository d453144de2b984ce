"""The ``kvc`` torch.compile backend: run the kvc passes, then hand the graph to Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model,
backend="kvc", options={...})`` works without importing ``kvc_compile`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from kvc_compile.config import CompressionConfig
from kvc_compile.passes import PassManager


def kvc_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    # torch.compile refuses mode together with options, so ``mode`` only arrives alone; accepting it
    # lets that call reach the clear "needs options" error instead of a TypeError.
    config = CompressionConfig.from_options(options)  # validate before touching the graph
    PassManager(config).run(gm)
    if config.inner_backend == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


__all__ = ["kvc_backend"]
