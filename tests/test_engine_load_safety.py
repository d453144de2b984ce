"""Loading an engine checks its manifest; generating checks its inputs; kvc-run turns both into one line.

One tiny engine (random two-layer Llama, ``exported`` target, a word-level tokenizer) is built per
module; tampering tests edit a copy of it.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_model

from kvc_compile.cli.run import DEFAULT_NEW_TOKENS
from kvc_compile.cli.run import main as run_cli
from kvc_compile.engine import Engine, EngineError, build
from kvc_compile.engine.manifest import MANIFEST, Manifest
from kvc_compile.engine.runtime import Generation

VOCAB = TINY["vocab_size"]
WINDOW = 8  # SnapKV's observation window: prompts this short are kept whole
MAX_NEW_TOKENS = DEFAULT_NEW_TOKENS + 8  # above kvc-run's default, so the default is what it decodes


def word_tokenizer():
    """A word-level tokenizer within the tiny vocabulary, with a pad token and no EOS (so greedy runs
    decode to their length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "hello", "world", "hi", "there", *(f"w{i}" for i in range(6, VOCAB))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "engine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(tiny_model("llama", attn_implementation="kvc"),
              {"method": "snapkv", "compression_ratio": 0.5, "window_size": WINDOW}, out, target="exported",
              tokenizer=word_tokenizer(), max_context=40, max_new_tokens=MAX_NEW_TOKENS, max_batch=2,
              progress=False)
    return out


@pytest.fixture(scope="module")
def engine(engine_dir) -> Engine:
    return Engine.load(engine_dir, trusted=True)


def tampered(engine_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the engine whose manifest ``edit`` changed (in place, as a dict)."""
    copy = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    raw = json.loads((copy / MANIFEST).read_text())
    edit(raw, copy)
    (copy / MANIFEST).write_text(json.dumps(raw))
    return copy


def expect_refused(folder: Path, *parts: str) -> str:
    with pytest.raises(EngineError) as caught:
        Engine.load(folder, trusted=True)
    message = str(caught.value)
    assert str(folder / MANIFEST) in message or str(folder) in message
    for part in parts:
        assert part in message, message
    return message


def set_key(key, value):
    def edit(raw, _folder):
        raw[key] = value
    return edit


# --- 1. the manifest's values -----------------------------------------------------------------------

@pytest.mark.parametrize("edit, parts", [
    (set_key("capacity", "60"), ["'capacity'", "a list of 2 integers"]),
    (set_key("capacity", [100]), ["'capacity'", "a list of 2 integers"]),
    (set_key("prompt_slots", [20, 20, 20]), ["'prompt_slots'", "a list of 2 integers"]),
    (set_key("max_new_tokens", "8"), ["'max_new_tokens'", "an integer"]),
    (set_key("max_new_tokens", MAX_NEW_TOKENS + 1), ["'capacity[0]'", "max_new_tokens"]),
    (set_key("max_batch", -1), ["'max_batch'", ">= 1"]),
    (set_key("max_context", 0), ["'max_context'"]),
    (set_key("max_context", 80), ["'prefill'", "max_context (80)"]),
    (set_key("eos_token_ids", ["2"]), ["'eos_token_ids[0]'", "an integer"]),
    (set_key("eos_token_ids", 2), ["'eos_token_ids'", "a list"]),
    (set_key("pad_token_id", VOCAB), ["'pad_token_id'", f"[0, {VOCAB - 1}]"]),
    (set_key("packed", "no"), ["'packed'"]),
    (set_key("state_names", []), ["'state_names'"]),
    (set_key("decode", {"file": "decode.ep.pt2", "min_length": "1"}), ["'decode.min_length'"]),
    (set_key("prefill", []), ["'prefill'"]),
    (set_key("device", 7), ["'device'"]),
    (set_key("weights", {"programs": {}}), ["'weights.file'"]),
    (set_key("extra", 1), ["unknown key 'extra'"]),
    (lambda raw, _: raw.pop("decode"), ["has no 'decode'"]),
    (lambda raw, _: raw["model"].pop("vocab_size"), ["'model.vocab_size'"]),
    (lambda raw, _: raw["files"].update({next(iter(raw["files"])): "abc"}), ["SHA-256"]),
])
def test_an_edited_manifest_value_is_named(engine_dir, tmp_path, edit, parts):
    expect_refused(tampered(engine_dir, tmp_path, edit), *parts)


def test_a_manifest_that_is_not_utf8_is_reported_as_corrupted(engine_dir, tmp_path):
    copy = Path(shutil.copytree(engine_dir, tmp_path / "engine"))
    (copy / MANIFEST).write_bytes(b'{"format_version": 3, "target": "\xff"}')
    expect_refused(copy, "is corrupted")


def test_an_unknown_device_name_is_named(engine_dir, tmp_path):
    expect_refused(tampered(engine_dir, tmp_path, set_key("device", "gpu-17")), "'device'", "gpu-17")


# --- 1. the manifest's paths ------------------------------------------------------------------------

def outside_copy(folder: Path, name: str) -> Path:
    """A copy of the engine's file ``name`` beside the engine directory (same bytes, same hash)."""
    target = folder.parent / f"outside-{name}"
    shutil.copyfile(folder / name, target)
    return target


def program_moved_outside(absolute: bool):
    def edit(raw, folder):
        name = raw["decode"]["file"]
        target = outside_copy(folder, name)
        raw["decode"]["file"] = str(target) if absolute else f"../{target.name}"
        raw["files"][raw["decode"]["file"]] = raw["files"].pop(name)
        raw["weights"]["programs"][raw["decode"]["file"]] = raw["weights"]["programs"].pop(name)
    return edit


def tokenizer_outside(raw, folder):
    shutil.copytree(folder / raw["tokenizer"], folder.parent / "tokenizer")
    raw["tokenizer"] = "../tokenizer"


@pytest.mark.parametrize("edit, parts", [
    (program_moved_outside(absolute=True), ["is not a relative path"]),
    (program_moved_outside(absolute=False), ["outside the engine directory"]),
    (tokenizer_outside, ["'../tokenizer'", "outside the engine directory"]),
    (lambda raw, folder: raw["files"].update({"../elsewhere": "0" * 64}), ["'../elsewhere'", "outside"]),
])
def test_paths_must_stay_inside_the_engine(engine_dir, tmp_path, edit, parts):
    expect_refused(tampered(engine_dir, tmp_path, edit), *parts)


def test_a_symlink_out_of_the_engine_is_refused(engine_dir, tmp_path):
    def edit(raw, folder):
        name = raw["decode"]["file"]
        target = outside_copy(folder, name)
        (folder / name).unlink()
        (folder / name).symlink_to(target)  # the same bytes: its hash still matches

    expect_refused(tampered(engine_dir, tmp_path, edit), "resolves to", "outside the engine directory")


def test_a_symlink_inside_the_engine_is_followed(engine_dir, tmp_path):
    def edit(raw, folder):
        name = raw["decode"]["file"]
        (folder / name).rename(folder / "real-decode")
        (folder / name).symlink_to("real-decode")
        raw["files"]["real-decode"] = raw["files"][name]

    Manifest.read(tampered(engine_dir, tmp_path, edit))


@pytest.mark.parametrize("listed", ["program", "weights", "tokenizer file"])
def test_every_loaded_file_must_be_listed(engine_dir, tmp_path, listed):
    def edit(raw, folder):
        if listed == "program":
            raw["files"].pop(raw["decode"]["file"])
        elif listed == "weights":
            raw["files"].pop(raw["weights"]["file"])
        else:
            (folder / raw["tokenizer"] / "added_tokens.json").write_text("{}")  # unlisted, and the tokenizer reads it

    expect_refused(tampered(engine_dir, tmp_path, edit), "not listed in 'files'")


def test_the_built_engine_passes_its_own_checks(engine_dir):
    manifest = Manifest.read(engine_dir)
    assert set(manifest.loaded_files(engine_dir)) <= set(manifest.files)
    assert any(name.startswith("tokenizer/") for name in manifest.loaded_files(engine_dir))


# --- 3. generate's inputs ---------------------------------------------------------------------------

def test_one_string_is_one_prompt(engine):
    assert len(engine.generate("hello world", 2).tokens) == 1
    assert engine.generate("hello world", 2).tokens == engine.generate(["hello world"], 2).tokens
    ids, mask = engine.encode("hello")
    assert ids.shape == (1, 1) and ids.tolist() == [[2]]


def test_one_list_of_ids_or_a_tensor_is_one_prompt(engine):
    expected = engine.generate([[5, 6, 7]], 2).tokens
    assert engine.generate([5, 6, 7], 2).tokens == expected
    assert engine.generate(torch.tensor([5, 6, 7]), 2).tokens == expected
    assert engine.generate(torch.tensor([[5, 6, 7]]), 2).tokens == expected


@pytest.mark.parametrize("prompts, message", [
    ("", "prompt 0 is empty text"),
    (["hi", "   "], "prompt 1 ('   ') encodes to no tokens"),
    ([[5, 6], []], "prompt 1 is empty"),
    ([], "no prompts given"),
    ([[5, -1]], f"token id -1 is not in this engine's vocabulary of {VOCAB} tokens"),
    ([[5], [VOCAB]], f"prompt 1: token id {VOCAB} is not in this engine's vocabulary of {VOCAB} tokens"),
    (torch.tensor([[5, -3]]), "token id -3"),
    ([[5, 6.5]], "6.5 is not a token id"),
    ([[5, 6], "hi"], "not a mix"),
    (torch.ones(1, 3), "must be integers"),
    ([[5]] * 3, "exceed this engine's max batch of 2"),
    ([[5] * 41], "more than this engine's max context of 40"),
])
def test_bad_prompts_are_refused(engine, prompts, message):
    with pytest.raises(EngineError, match=None) as caught:
        engine.generate(prompts, 2)
    assert message in str(caught.value)


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer in [1, 72]"),
    ({"max_new_tokens": MAX_NEW_TOKENS + 1}, f"rebuild with --max-new-tokens {MAX_NEW_TOKENS + 1}"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": -0.5}, "temperature must be 0 (greedy) or more"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"seed": -1}, "seed must be an integer"),
])
def test_bad_generation_options_are_refused(engine, options, message):
    options = {"max_new_tokens": 2, **options}
    with pytest.raises(EngineError) as caught:
        engine.generate([[5, 6, 7]], options.pop("max_new_tokens"), **options)
    assert message in str(caught.value)


def test_a_prompt_kept_whole_is_a_note_not_a_warning(engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compression op's warning would raise here
        short = engine.generate([[5, 6, 7]], 2)
        long = engine.generate([list(range(5, 5 + 2 * WINDOW))], 2)
    assert len(short.notes) == 1
    assert "the prompt is 3 tokens long" in short.notes[0] and f"window of {WINDOW} tokens" in short.notes[0]
    assert "window_size" not in short.notes[0]  # nothing the engine's user can change
    assert long.notes == []


# --- 2, 4, 5. kvc-run ---------------------------------------------------------------------------------

@pytest.fixture
def cli_engine(engine, monkeypatch) -> None:
    """kvc-run gets the module's loaded engine (loading one takes seconds) once its manifest passes."""
    def load(cls, folder, *, trusted: bool = False) -> Engine:
        Manifest.read(Path(folder))
        assert trusted
        return engine

    monkeypatch.setattr(Engine, "load", classmethod(load))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_kvc_run_errors_are_one_line(engine_dir, tmp_path, capsys, cli_engine):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    engine = str(engine_dir)
    cases = [
        (["--token-ids", "1 x"], "'x' is not a token id"),
        ([str(tmp_path / "missing"), "--token-ids", "5 6"], "does not exist"),
        (["--prompt-file", str(latin1)], f"{latin1} is not UTF-8 text"),
        (["--token-ids", "5 6", "--temperature", "nan"], "--temperature must be a finite number"),
        (["--token-ids", "5 6", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--token-ids", "5 6", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--token-ids", f"5 {VOCAB}"], f"token id {VOCAB} is not in this engine's vocabulary of {VOCAB}"),
        (["--token-ids", "5 -2"], "token id -2 is not in this engine's vocabulary"),
        (["--token-ids", "5 6", "--chat"], "--chat wraps text prompts"),
        (["--prompt", ""], "prompt 0 is empty text"),
    ]
    for argv, message in cases:
        argv = argv if argv[0].startswith(str(tmp_path)) else [engine, *argv]
        code, _, err = run(capsys, *argv, "--trust-engine")
        assert code == 2, argv
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("kvc-run: error: ") and message in err, (argv, err)


def test_kvc_run_needs_trust_for_exported_engines_and_says_why(engine_dir, capsys):
    code, _, err = run(capsys, str(engine_dir), "--token-ids", "5 6")
    assert code == 2 and "--trust-engine" in err
    with pytest.raises(SystemExit):
        run_cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-engine" in text and "runs its code" in text and "like any shared library" in text
    assert f"default: {DEFAULT_NEW_TOKENS}" in text


def test_kvc_run_decodes_a_default_number_of_tokens_and_notes_short_prompts(engine_dir, capsys, cli_engine):
    code, out, err = run(capsys, str(engine_dir), "--token-ids", "5 6 7", "--json", "--trust-engine")
    assert code == 0
    assert len(json.loads(out)[0]["tokens"]) == DEFAULT_NEW_TOKENS < MAX_NEW_TOKENS  # no EOS: decodes them all
    assert "kvc-run: note: the prompt is 3 tokens long" in err
    assert "Warning" not in err and "window_size" not in err


def test_kvc_run_prints_generated_text_as_text(engine_dir, capsys, monkeypatch, cli_engine):
    def generate(self, prompts, max_new_tokens, **_):
        return Generation([[1]], ["[/bold] [red]x"], 0.0, 0.0, [1])

    monkeypatch.setattr(Engine, "generate", generate)
    code, out, _ = run(capsys, str(engine_dir), "--prompt", "hi", "--prompt", "there", "--trust-engine")
    assert code == 0 and "[/bold] [red]x" in out


def test_an_onnx_program_whose_inputs_do_not_match_is_refused_at_load(tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    import onnx
    from onnx import TensorProto, helper

    from kvc_compile.plugins.onnx.runtime import OnnxProgram

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "program.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert OnnxProgram(path, ["x"])(torch.ones(1))[0].tolist() == [1.0]
    with pytest.raises(ValueError, match=r"takes inputs \['x'\] that this engine's runtime does not pass"):
        OnnxProgram(path, ["input_ids"])
    with pytest.raises(ValueError, match="returns 1 outputs.*logits and 1 updated buffers"):
        OnnxProgram(path, ["x"], written=[0])
