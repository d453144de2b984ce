"""A retrieval-specialist fixture: a 2-layer Llama of 410K parameters trained from scratch on
8-pair key-value retrieval, mixed half-and-half with a copy task whose repeat starts at a random
offset (so copying needs an induction head, the circuit that retrieval needs too).

Its retrieval prompt is ``BOS k1 v1 ... k8 v8 SEP q`` and the answer is the value of key ``q``:
with the full cache it answers 100% of 512 held-out prompts, and when compression evicts the queried
pair it drops to chance (1 in 30 values; 3 of 256 measured), while evicting another pair costs
nothing. That makes it a sharp, fast test of whether a method keeps what a query will need. Train it
with ``python -m kvc_compile.eval.retrieval --out DIR`` (3000 steps, 310-350 s on one CPU thread;
retrieval jumps from ~20% to ~98% around step 500, once the induction circuit forms); the checkpoint
ships in ``kvc_compile/data/retrieval-llama``.
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
STEPS = 3000
FIXTURE_DIR = Path(__file__).resolve().parent.parent / "data" / "retrieval-llama"


def fixture_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD,
        tie_word_embeddings=False,
    )


def _key_value_context(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``BOS k1 v1 ... k8 v8 SEP`` [batch, 2 + 2 * PAIRS] with distinct keys per row, and the keys
    and values [batch, PAIRS]."""
    keys = torch.stack([torch.randperm(len(KEYS), generator=generator)[:PAIRS] for _ in range(batch)]) + KEYS.start
    values = torch.randint(VALUES.start, VALUES.stop, (batch, PAIRS), generator=generator)
    pairs = torch.stack([keys, values], dim=-1).reshape(batch, 2 * PAIRS)
    return torch.cat([torch.full((batch, 1), BOS), pairs, torch.full((batch, 1), SEP)], dim=1), keys, values


def retrieval_batch(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(context [batch, 2 + 2 * PAIRS], query [batch, 1], answer [batch]): ``BOS k1 v1 ... SEP`` then ``q``."""
    context, keys, values = _key_value_context(batch, generator)
    asked = torch.randint(0, PAIRS, (batch,), generator=generator)
    rows = torch.arange(batch)
    return context, keys[rows, asked][:, None], values[rows, asked]


QUERIES = 8  # answers asked per training sample


def _copy_batch(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``BOS x1..xm SEP x1..xm x1..`` up to ``length`` tokens, ``m`` random per row, loss on the repeats.

    The repeat starts at a different offset in every row, so copying by relative position does not
    work: the model has to find the previous occurrence of the current token and read the token after
    it (an induction head), which is the circuit retrieval needs (find the queried key, read its value).
    """
    span = torch.randint(4, length // 2 + 1, (batch, 1), generator=generator)
    symbols = torch.randint(KEYS.start, VALUES.stop, (batch, length // 2), generator=generator)
    position = torch.arange(length)[None].expand(batch, -1)
    first = symbols.gather(1, (position - 1).clamp(0, length // 2 - 1))
    repeat = symbols.gather(1, (position - span - 2).clamp(min=0) % span)
    ids = torch.where(position <= span, first, torch.where(position == span + 1, SEP, repeat))
    ids[:, 0] = BOS
    # The first repeated token follows SEP and cannot be predicted; every later one can.
    labels = torch.where(position >= span + 3, ids, -100)
    return ids, labels


def _training_batches(batch: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Half retrieval, half copy. Retrieval asks ``QUERIES`` keys in a row (``SEP q1 a1 q2 a2 ...``,
    loss on every answer: denser signal, as in multi-query associative recall) of 8 pairs; evaluation
    asks one key, right after ``SEP``."""
    half = batch // 2
    context, keys, values = _key_value_context(half, generator)
    asked = torch.randint(0, PAIRS, (half, QUERIES), generator=generator)
    rows = torch.arange(half)[:, None]
    queries = torch.stack([keys[rows, asked], values[rows, asked]], dim=-1).reshape(half, 2 * QUERIES)
    ids = torch.cat([context, queries], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * PAIRS + 3 :: 2] = ids[:, 2 * PAIRS + 3 :: 2]  # the answers
    return [(ids, labels), _copy_batch(batch - half, ids.shape[1], generator)]


def _lr_factor(step: int, steps: int, warmup: int = 200) -> float:
    """Linear warmup, constant (the induction circuit forms on the plateau), then a linear decay over
    the last 40% of the steps to a tenth."""
    decay_start = int(0.6 * steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    return 1.0 - 0.9 * (step - decay_start) / max(1, steps - decay_start)


def train(steps: int = STEPS, batch: int = 64, seed: int = 0, lr: float = 2e-3,
          log_every: int = 250) -> PreTrainedModel:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(fixture_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
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


FIXTURE_MODEL = "retrieval-fixture"  # kvc-eval's name for it
FIXTURE_TASK = "kv_retrieval"
# The fixture's prompts are 18-19 tokens, shorter than most methods' default observation windows,
# sinks and chunks (which would keep every token): these options scale them to the fixture.
_SNAPKV_LIKE = {"window_size": 1, "kernel_size": 3}
FIXTURE_OPTIONS: dict[str, dict] = {
    "snapkv": _SNAPKV_LIKE, "pyramidkv": _SNAPKV_LIKE, "lava": _SNAPKV_LIKE, "obcache": _SNAPKV_LIKE,
    "adakv": {"scorer_options": _SNAPKV_LIKE},
    "criticalkv": {"scorer_options": _SNAPKV_LIKE}, "criticaladakv": {"scorer_options": _SNAPKV_LIKE},
    "chunkkv": {"scorer_options": _SNAPKV_LIKE, "chunk_length": 2},
    "laq": {**_SNAPKV_LIKE, "stage1_options": _SNAPKV_LIKE},
    "morphkv": {"window_size": 2},
    "curdkv": {"num_sinks": 1, "local_window_size": 2},
    "adacurdkv": {"num_sinks": 1, "local_window_size": 2},
    "compactor": {"protected_first": 1, "protected_last": 1},
    "expected_attention": {"n_sink": 1},
    "streamingllm": {"n_sink": 1},
    "lagkv": {"n_sink": 1, "lag_size": 4},
}


class FixtureTasks:
    """kvc-eval's samples for the fixture: one task, ``kv_retrieval`` (``BOS k1 v1 ... k8 v8 SEP``,
    then the asked key), scored 1 when the next token is the asked key's value. Seeded like the text
    tasks: sample ``s`` is ``retrieval_batch`` drawn from seed ``s``."""

    tasks = (FIXTURE_TASK,)
    context_tokens = 2 + 2 * PAIRS

    def __init__(self) -> None:
        self.settings = {"model": FIXTURE_MODEL, "pairs": PAIRS, "options": FIXTURE_OPTIONS}

    def record(self, model: PreTrainedModel, task: str, seed: int, options: dict | None, query_aware: bool,
               path: str) -> dict:
        from kvc_compile.eval.leaderboard import answer_ids

        context, query, answer = self._sample(task, seed, query_aware)
        prediction = int(answer_ids(model, context, query, options, 1, path)[0, 0])
        return _record(seed, prediction, int(answer))

    def records(self, model: PreTrainedModel, task: str, seed: int, configs: list[dict | None],
                query_aware: bool) -> list[dict]:
        """One record per configuration for one sample, all from one prefill (the shared-prefill path)."""
        from kvc_compile.eval.shared_prefill import answer_configs

        context, query, answer = self._sample(task, seed, query_aware)
        answers = answer_configs(model, context, query, configs, 1)
        return [_record(seed, int(tokens[0, 0]), answer) for tokens in answers]

    def _sample(self, task: str, seed: int, query_aware: bool) -> tuple[Tensor, Tensor | None, int]:
        if task not in self.tasks:
            raise ValueError(f"the retrieval fixture has one task, {FIXTURE_TASK}; got {task!r}")
        context, query, answer = retrieval_batch(1, torch.Generator().manual_seed(seed))
        if query_aware:  # the asked key is compressed with the pairs
            context, query = torch.cat([context, query], dim=1), None
        return context, query, int(answer)


def _record(seed: int, prediction: int, answer: int) -> dict:
    return {"seed": seed, "prediction": prediction, "answers": [answer], "score": float(prediction == answer)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the retrieval-specialist fixture")
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(args.steps, seed=args.seed)
    accuracy = retrieval_accuracy(model)
    model.save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, retrieval accuracy {accuracy:.4f} (512 held-out prompts), "
          f"{time.perf_counter() - start:.0f} s on {args.threads} thread(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
