"""kvc-build never loses the user's files, writes shareable files, stores the weights once, refuses
what cannot run before loading the model, and engines that unpickle load only when trusted."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import warnings

import pytest
import torch
from conftest import tiny_model

from kvc_compile import reference_generate
from kvc_compile.cli.build import main as build_cli
from kvc_compile.engine import Engine, EngineError, build
from kvc_compile.engine.manifest import MANIFEST
from kvc_compile.engine.runtime import _load_program

# The modules, not the functions of the same name that their packages export.
build_module = importlib.import_module("kvc_compile.engine.build")
build_cli_module = importlib.import_module("kvc_compile.cli.build")

# One prefill program (every prompt keeps one entry per head) and a decode program: a build of a
# few seconds. A large vocabulary makes the weights outweigh the programs' graphs.
OPTIONS = {"method": "knorm", "budget": 1}
BIG_WEIGHTS = {"vocab_size": 8192, "hidden_size": 128, "intermediate_size": 256}
SIZES = {"max_context": 32, "max_new_tokens": 4, "max_batch": 2}
UMASK = 0o022
RANDOM_PRESET = ["--model", "smollm2-135m", "--weights", "random", "--layers", "1", "--method", "knorm",
                 "--target", "exported", "--max-context", "32", "--max-new-tokens", "4", "--max-batch", "2"]


def quiet_build(model, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(model, OPTIONS, out, target="exported", progress=False, **{**SIZES, **kwargs})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "engine"
    previous = os.umask(UMASK)
    try:
        quiet_build(tiny_model("llama", attn_implementation="kvc", **BIG_WEIGHTS), out)
    finally:
        os.umask(previous)
    return out


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".kvc-" in path.name)


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals must come before the model loads."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(build_cli_module, "load_model", fail)


def test_exported_engines_store_the_weights_once(engine):
    weights = (engine / "weights.safetensors").stat().st_size
    programs = {path.name: path.stat().st_size for path in engine.glob("*.ep.pt2")}
    assert len(programs) == 2 and all(size < weights / 4 for size in programs.values()), (weights, programs)
    total = sum(path.stat().st_size for path in engine.rglob("*") if path.is_file())
    assert total < 1.5 * weights


def test_exported_engines_keep_the_reference_tokens(engine):
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    tokens = Engine.load(engine, trusted=True).generate([ids[0].tolist()], 4).tokens
    assert tokens == reference_generate(tiny_model("llama", **BIG_WEIGHTS), ids, OPTIONS, 4).tolist()


def test_exported_engines_with_their_weights_inside_still_load(engine, tmp_path):
    from safetensors.torch import load_file

    from kvc_compile.engine.manifest import Manifest
    from kvc_compile.engine.programs import with_weights

    inside = shutil.copytree(engine, tmp_path / "engine")
    manifest = Manifest.read(inside)
    # Clones: torch.export.save cannot store views into the one buffer safetensors may load into.
    tensors = {key: tensor.clone() for key, tensor in load_file(str(inside / manifest.weights["file"])).items()}
    for file, keys in manifest.weights["programs"].items():
        exported = torch.export.load(str(inside / file))
        with_weights(exported, keys, tensors)  # puts the weights back into the program
        torch.export.save(exported, str(inside / file))
    (inside / manifest.weights["file"]).unlink()
    manifest.weights = None
    manifest.write(inside)
    prompt = [list(range(5, 25))]
    assert Engine.load(inside, trusted=True).generate(prompt, 4).tokens == \
        Engine.load(engine, trusted=True).generate(prompt, 4).tokens


def test_exported_engines_load_only_when_trusted(engine, monkeypatch):
    def unpickle(*args, **kwargs):
        raise AssertionError("torch.export.load ran on an untrusted engine")

    monkeypatch.setattr(torch.export, "load", unpickle)
    with pytest.raises(EngineError, match=r"trusted=True.*--trust-engine"):
        Engine.load(engine)


def test_aoti_packages_holding_pickled_programs_are_refused(tmp_path):
    exported = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    torch.export.save(exported, str(tmp_path / "prefill.pt2"))  # models/... payloads, which load_pt2 unpickles
    with pytest.raises(EngineError, match="not an AOTInductor package written by kvc-build"):
        _load_program(tmp_path / "prefill.pt2", "aoti")


def test_engine_files_get_the_modes_of_the_umask(engine):
    assert stat.S_IMODE(engine.stat().st_mode) == 0o777 & ~UMASK
    for path in engine.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~UMASK, path


def test_force_replaces_an_engine_through_a_symlink_and_leaves_nothing_behind(engine, tmp_path):
    target = shutil.copytree(engine, tmp_path / "engine")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    quiet_build(tiny_model("llama", attn_implementation="kvc"), link, force=True, max_new_tokens=6)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads((target / MANIFEST).read_text())["max_new_tokens"] == 6
    assert leftovers(tmp_path) == []


def test_a_failed_force_build_keeps_the_old_engine(engine, tmp_path, monkeypatch):
    old = shutil.copytree(engine, tmp_path / "engine")
    before = snapshot(old)
    save_program = build_module._save_program

    def save_then_interrupt(*args, **kwargs):
        save_program(*args, **kwargs)  # a program is written, then the build is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_save_program", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        quiet_build(tiny_model("llama", attn_implementation="kvc"), old, force=True)
    assert snapshot(old) == before
    assert leftovers(tmp_path) == []


def test_arguments_are_checked_before_force_touches_anything(engine, tmp_path):
    old = shutil.copytree(engine, tmp_path / "engine")
    before = snapshot(old)
    with pytest.raises(EngineError, match="observation window"):  # a check that used to run after the deletion
        build(tiny_model("llama"), {"method": "snapkv", "compression_ratio": 0.5, "window_size": 64}, old,
              target="exported", progress=False, max_context=32, force=True)
    assert snapshot(old) == before


def test_force_never_replaces_the_models_checkpoint(engine, tmp_path):
    checkpoint = shutil.copytree(engine, tmp_path / "engine")  # even one that looks like an engine
    model = tiny_model("llama")
    model.config._name_or_path = str(checkpoint)
    with pytest.raises(EngineError, match="model's checkpoint"):
        quiet_build(model, tmp_path, force=True)
    with pytest.raises(EngineError, match="model's checkpoint"):
        quiet_build(model, checkpoint, force=True)
    assert (checkpoint / MANIFEST).is_file()


def test_force_refuses_folders_that_are_not_engines(tmp_path, no_model_load, capsys):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.tex").write_text("years of work")
    assert build_cli([*RANDOM_PRESET, "--out", str(documents), "--force"]) == 2
    assert "not an engine directory" in capsys.readouterr().err
    assert (documents / "thesis.tex").read_text() == "years of work"


def test_force_refuses_an_engine_holding_other_files(engine, tmp_path, no_model_load, capsys):
    mixed = shutil.copytree(engine, tmp_path / "engine")
    (mixed / "notes.txt").write_text("mine")
    assert build_cli([*RANDOM_PRESET, "--out", str(mixed), "--force"]) == 2
    assert "other files (notes.txt)" in capsys.readouterr().err
    assert (mixed / "notes.txt").is_file() and (mixed / MANIFEST).is_file()


def test_force_refuses_the_current_directory_and_its_parents(engine, tmp_path, monkeypatch, no_model_load, capsys):
    cwd = shutil.copytree(engine, tmp_path / "engine")  # an engine, so only the cwd rule refuses it
    monkeypatch.chdir(cwd)
    for out in (".", str(cwd), ".."):
        assert build_cli([*RANDOM_PRESET, "--out", out, "--force"]) == 2, out
        assert "current directory" in capsys.readouterr().err, out
    assert (cwd / MANIFEST).is_file()


def test_force_refuses_the_models_folder_from_the_command_line(tmp_path, no_model_load, capsys):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / MANIFEST).write_text(json.dumps({"format_version": 3, "target": "exported", "files": {}}))
    argv = ["--model", str(checkpoint), "--method", "knorm", "--target", "exported"]
    for out in (checkpoint, tmp_path):
        assert build_cli([*argv, "--out", str(out), "--force"]) == 2
        assert "model's checkpoint" in capsys.readouterr().err
    assert (checkpoint / MANIFEST).is_file()


@pytest.mark.parametrize("extra, message", [
    (["--target", "onnx", "--dtype", "float16"], "ONNX Runtime runs the compression plugins in float32 only"),
    (["--max-context", "9000"], "exceeds the model's"),
    (["--device", "tpu"], "--device"),
])
def test_builds_that_cannot_run_are_refused_before_the_model_loads(extra, message, tmp_path, no_model_load,
                                                                    capsys):
    assert build_cli([*RANDOM_PRESET, "--out", str(tmp_path / "engine"), *extra]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("out, message", [("missing/engine", "does not exist"), ("file", "is a file"),
                                          ("dangling", "does not exist")])
def test_bad_out_paths_are_refused_before_the_model_loads(out, message, tmp_path, no_model_load, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "engine")
    assert build_cli([*RANDOM_PRESET, "--out", str(tmp_path / out)]) == 2
    assert message in capsys.readouterr().err


def test_sliding_window_models_are_refused_before_anything_is_written(tmp_path):
    """Engines have no windowed cache layers: the build says so and names the compiled path instead."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(EngineError, match=r"sliding-window layers \(1 of 2, window 16\).*CompressedCache\(config="):
        build(model, {"method": "knorm", "compression_ratio": 0.5}, tmp_path / "engine", target="exported",
              max_context=64, max_new_tokens=8)
    assert not any(tmp_path.iterdir())


def test_the_build_does_not_warn_about_its_own_short_example_prompts(tmp_path):
    from kvc_compile.ops.compress import ShortPromptWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(tiny_model("llama"), {"method": "snapkv", "window_size": 8, "compression_ratio": 0.5},
              tmp_path / "engine", target="exported", progress=False, **SIZES)
    assert not [w for w in caught if issubclass(w.category, ShortPromptWarning)]
