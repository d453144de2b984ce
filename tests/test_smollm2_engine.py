"""kvc-build / kvc-run on SmolLM2-135M: the engine keeps the tokens of torch.compile and of the reference."""

from __future__ import annotations

import warnings

import pytest
from conftest import compiled_greedy_steps

from kvc_compile import reference_generate
from kvc_compile.cli.run import main as run_cli
from kvc_compile.engine import Engine, build

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


@pytest.fixture(scope="module")
def loaded(engine):
    return Engine.load(engine)  # loading SmolLM2's programs takes a while: once per module


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def test_engine_tokens_equal_compiled_and_reference(smollm2, loaded):
    model, tokenizer = smollm2
    prompts = [chat(tokenizer, question) for question in QUESTIONS]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any() and ids.shape[1] > 64  # a padded batch, longer than SnapKV's window
    engine_tokens = loaded.generate(prompts, NEW_TOKENS, stop_on_eos=False).tokens
    compiled, *_ = compiled_greedy_steps(model, {**OPTIONS, "inner_backend": "eager"}, ids, mask, NEW_TOKENS)
    assert engine_tokens == compiled.tolist()
    assert engine_tokens == reference_generate(model, ids, OPTIONS, NEW_TOKENS, mask).tolist()
    alone = loaded.generate([prompts[1]], NEW_TOKENS, stop_on_eos=False).tokens
    assert alone[0] == reference_generate(model, ids[1:, -int(mask[1].sum()):], OPTIONS, NEW_TOKENS).tolist()[0]


def test_kvc_run_prints_the_engine_text(smollm2, engine, loaded, tmp_path, capsys):
    _, tokenizer = smollm2
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(QUESTIONS[0])
    assert run_cli([str(engine), "--prompt-file", str(prompt), "--chat", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out.strip()
    tokens = loaded.generate([chat(tokenizer, QUESTIONS[0])], NEW_TOKENS).tokens[0]
    assert printed == tokenizer.decode(tokens, skip_special_tokens=True).strip()
