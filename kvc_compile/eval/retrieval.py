"""A retrieval-specialist fixture: a 2-layer Llama of ~0.6M parameters trained from scratch on
8-pair key-value retrieval, mixed half-and-half with a copy task (so it learns to read its
context, not only to look up).

Its retrieval prompt is ``BOS k1 v1 ... k8 v8 SEP q`` and the answer is the value of key ``q``:
with the full cache it answers almost always, and when compression evicts the queried pair it
drops to chance (1 in 30 values). That makes it a sharp, fast test of whether a method keeps what
a query will need. Train it with ``python -m kvc_compile.eval.retrieval --out DIR`` (about ten
minutes on one CPU thread); the checkpoint ships in ``kvc_compile/data/retrieval-llama``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

PAD, BOS, SEP = 0, 1, 2
KEYS = range(4, 34)  # 30 key symbols
VALUES = range(34, 64)  # 30 value symbols
PAIRS = 8
FIXTURE_DIR = Path(__file__).resolve().parent.parent / "data" / "retrieval-llama"


def fixture_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD,
        tie_word_embeddings=True,
    )


def retrieval_batch(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(context [batch, 2 + 2 * PAIRS], query [batch, 1], answer [batch]): ``BOS k1 v1 ... SEP`` then ``q``."""
    keys = torch.stack([torch.randperm(len(KEYS), generator=generator)[:PAIRS] for _ in range(batch)]) + KEYS.start
    values = torch.randint(VALUES.start, VALUES.stop, (batch, PAIRS), generator=generator)
    asked = torch.randint(0, PAIRS, (batch,), generator=generator)
    pairs = torch.stack([keys, values], dim=-1).reshape(batch, 2 * PAIRS)
    context = torch.cat([torch.full((batch, 1), BOS), pairs, torch.full((batch, 1), SEP)], dim=1)
    rows = torch.arange(batch)
    return context, keys[rows, asked][:, None], values[rows, asked]


def _copy_batch(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``BOS x1..x8 SEP x1..x8`` with the loss on the copied half."""
    symbols = torch.randint(KEYS.start, VALUES.stop, (batch, PAIRS), generator=generator)
    ids = torch.cat([torch.full((batch, 1), BOS), symbols, torch.full((batch, 1), SEP), symbols], dim=1)
    labels = ids.clone()
    labels[:, : PAIRS + 2] = -100
    return ids, labels


def _training_batches(batch: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Half retrieval, half copy. Retrieval asks several keys in a row (``SEP q1 a1 q2 a2 ...``, loss on
    every answer: denser signal, as in multi-query associative recall) with 1 to 8 pairs in the
    context (a curriculum: one pair is easy); evaluation asks one key of 8 pairs."""
    half = batch // 2
    keys = torch.stack([torch.randperm(len(KEYS), generator=generator)[:PAIRS] for _ in range(half)]) + KEYS.start
    values = torch.randint(VALUES.start, VALUES.stop, (half, PAIRS), generator=generator)
    used = torch.randint(1, PAIRS + 1, (half,), generator=generator)
    # Padding pairs beyond `used` repeat the first pair, so every key asked has exactly one value.
    slot = torch.arange(PAIRS)[None].expand(half, -1)
    keys = torch.where(slot < used[:, None], keys, keys[:, :1])
    values = torch.where(slot < used[:, None], values, values[:, :1])
    asked = (torch.rand(half, 4, generator=generator) * used[:, None]).long()
    rows = torch.arange(half)[:, None]
    queries = torch.stack([keys[rows, asked], values[rows, asked]], dim=-1).reshape(half, 8)
    pairs = torch.stack([keys, values], dim=-1).reshape(half, 2 * PAIRS)
    ids = torch.cat([torch.full((half, 1), BOS), pairs, torch.full((half, 1), SEP), queries], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -7::2] = ids[:, -7::2]  # the answers
    return [(ids, labels), _copy_batch(batch - half, generator)]


def train(steps: int = 8000, batch: int = 64, seed: int = 0, log_every: int = 500) -> PreTrainedModel:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(fixture_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        # Each task's loss is its own mean, so the one-token retrieval answers weigh as much as the copies.
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in _training_batches(batch, generator))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}, retrieval {retrieval_accuracy(model, 256):.3f}",
                  flush=True)
            model.train()
    return model.eval()


def load_fixture(path: Path = FIXTURE_DIR) -> PreTrainedModel:
    """The trained fixture (attention "kvc", so every cache layout works)."""
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no retrieval fixture at {path}; train one with: "
                                f"python -m kvc_compile.eval.retrieval --out {path}")
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="kvc").eval()
    model.generation_config.pad_token_id = PAD
    return model


@torch.no_grad()
def retrieval_accuracy(model: PreTrainedModel, samples: int = 512, seed: int = 1234) -> float:
    """Full-cache accuracy: the argmax after ``context + query`` is the queried value."""
    context, query, answer = retrieval_batch(samples, torch.Generator().manual_seed(seed))
    logits = model(torch.cat([context, query], dim=1)).logits[:, -1]
    return (logits.argmax(-1) == answer).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the retrieval-specialist fixture")
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(args.steps)
    accuracy = retrieval_accuracy(model)
    model.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, retrieval accuracy {accuracy:.4f} (512 held-out prompts), "
          f"{time.perf_counter() - start:.0f} s on {args.threads} thread(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
