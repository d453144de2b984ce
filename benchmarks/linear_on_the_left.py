"""SmolLM2's eager decode with every few-row ``F.linear`` computed as ``W @ x^T`` instead, alternating
with the plain one in one process (8 rows, a 512-token prompt, 10 timed steps each).

    python benchmarks/linear_on_the_left.py
"""

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvc_compile.models import load_model

PLAIN_LINEAR = F.linear


def weight_on_the_left(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product as ``F.linear`` for up to 16 rows without a bias, with the weight on the left."""
    if x.dim() < 2 or x.shape[:-1].numel() > 16 or bias is not None:
        return PLAIN_LINEAR(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    return torch.mm(weight, rows.t()).t().reshape(*x.shape[:-1], weight.shape[0])


def decode_ms_per_step(model, ids: torch.Tensor, steps: int = 12, warmup: int = 2) -> tuple[float, list[int]]:
    with torch.no_grad():
        cache = DynamicCache()
        token = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        tokens = [token]
        for step in range(steps):
            if step == warmup:
                start = time.perf_counter()
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
    return (time.perf_counter() - start) / (steps - warmup) * 1000, torch.cat(tokens, 1)[0].tolist()


def main() -> None:
    model, _ = load_model("smollm2-135m", torch.float32)
    ids = torch.randint(100, model.config.vocab_size, (8, 512), generator=torch.Generator().manual_seed(0))
    for name, linear in [("F.linear", PLAIN_LINEAR), ("W @ x^T", weight_on_the_left)] * 2:
        F.linear = linear  # nn.Linear calls F.linear through the module, so this reaches every layer
        ms, tokens = decode_ms_per_step(model, ids)
        print(f"{name}: {ms:.1f} ms/step, first row's tokens {tokens[:8]}")
    F.linear = PLAIN_LINEAR


if __name__ == "__main__":
    main()
