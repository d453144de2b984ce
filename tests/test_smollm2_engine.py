"""kvc-build / kvc-run on SmolLM2-135M: the engine keeps the tokens of torch.compile and of the reference."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import compiled_greedy_steps
from rich.console import Console

from kvc_compile import reference_generate
from kvc_compile.cli.run import _Streamer
from kvc_compile.cli.run import main as run_cli
from kvc_compile.engine import build

pytestmark = pytest.mark.smollm2

OPTIONS = {"method": "snapkv", "compression_ratio": 0.5}
NEW_TOKENS = 8
QUESTIONS = [
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name. " * 3,
    "List three rivers of Europe and the seas they flow into, one per line, without any commentary. " * 4,
]


@pytest.fixture(scope="module")
def engine(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    attention = model.config._attn_implementation
    out = tmp_path_factory.mktemp("smollm2") / "engine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The exported target: the same programs as AOTInductor's, without minutes of C++ compile.
        build(model, OPTIONS, out, target="exported", tokenizer=tokenizer, max_context=256,
              max_new_tokens=NEW_TOKENS, max_batch=2, progress=False)
    model.set_attn_implementation(attention)
    return out


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def test_kvc_run_tokens_equal_compiled_and_reference(smollm2, engine, capsys):
    """One kvc-run call (loading SmolLM2's programs takes a while) on a padded batch of two prompts."""
    model, tokenizer = smollm2
    argv = [str(engine), "--trust-engine", "--chat", "--max-new-tokens", str(NEW_TOKENS), "--json"]
    for question in QUESTIONS:
        argv += ["--prompt", question]
    assert run_cli(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    tokenizer.padding_side = "left"
    batch = tokenizer([chat(tokenizer, question) for question in QUESTIONS], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any() and ids.shape[1] > 64  # a padded batch, longer than SnapKV's window
    assert [row["prompt_tokens"] for row in rows] == mask.sum(-1).tolist()
    compiled, *_ = compiled_greedy_steps(model, {**OPTIONS, "inner_backend": "eager"}, ids, mask, NEW_TOKENS)
    reference = reference_generate(model, ids, OPTIONS, NEW_TOKENS, mask)
    eos = tokenizer.eos_token_id
    # kvc-run stops a row at EOS; the compiled and reference rows run on to NEW_TOKENS.
    assert [row["tokens"] for row in rows] == [until_eos(r, eos) for r in compiled.tolist()]
    assert compiled.tolist() == reference.tolist()
    assert [row["text"] for row in rows] == tokenizer.batch_decode([row["tokens"] for row in rows],
                                                                   skip_special_tokens=True)


def test_kvc_run_streams_one_prompt_as_its_tokens_arrive(smollm2):
    """The streaming printer kvc-run uses for a single prompt: whole characters, EOS not printed."""
    _, tokenizer = smollm2
    tokens = tokenizer("Café, naïve — déjà vu.")["input_ids"] + [tokenizer.eos_token_id]
    console = Console(record=True, width=200)
    engine = SimpleNamespace(tokenizer=tokenizer, manifest=SimpleNamespace(eos_token_ids=[tokenizer.eos_token_id]))
    stream = _Streamer(engine, console)
    printed = []
    for step, token in enumerate(tokens):
        stream(step, torch.tensor([token]))
        printed.append(console.export_text(clear=False))
    assert printed[-1] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert printed[-1] == printed[-2]  # EOS adds nothing
    assert len(set(printed)) > 3  # text arrived piece by piece
