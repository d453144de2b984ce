"""Pass-key retrieval prompts in the style of RULER: a number hidden in repetitive filler text."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PassKeySample:
    prompt: str
    answer: str
    depth: float  # where the needle sits, as a fraction of the filler


def passkey_sample(
    tokenizer: PreTrainedTokenizerBase, target_tokens: int, seed: int, depth: float | None = None
) -> PassKeySample:
    """A prompt of about ``target_tokens`` tokens with a 5-digit key at ``depth`` (seeded if None)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.1, 0.9) if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(INSTRUCTION + needle + QUESTION).input_ids)
    per_filler = len(tokenizer(FILLER * 10).input_ids) / 10
    repeats = max(1, round((target_tokens - fixed) / per_filler))
    before = round(repeats * depth)
    prompt = INSTRUCTION + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return PassKeySample(prompt, key, depth)


def answer_is_correct(generated_text: str, sample: PassKeySample) -> bool:
    return sample.answer in generated_text


def passkey_inputs(
    tokenizer: PreTrainedTokenizerBase, target_tokens: int, seed: int
) -> tuple[PassKeySample, torch.Tensor]:
    """A seeded sample and its tokenized prompt ([1, n] input ids)."""
    sample = passkey_sample(tokenizer, target_tokens, seed)
    return sample, tokenizer(sample.prompt, return_tensors="pt").input_ids
