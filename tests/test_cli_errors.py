"""kvc-eval, kvc-bench, kvc-demo and kvc-calibrate end a user error with one line on stderr and
exit 2, before any model loads where the error is in the arguments; model loading says what is
missing and how to provide it; a kvc-eval folder holds the results of one model and settings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from kvc_compile.bench.speed import SpeedResult
from kvc_compile.cli import bench, calibrate, demo
from kvc_compile.cli import eval as eval_cli
from kvc_compile.eval.leaderboard import read_records, run_grid
from kvc_compile.eval.retrieval import FIXTURE_MODEL, FIXTURE_TASK, FixtureTasks, load_fixture
from kvc_compile.models import ModelNotFoundError, load_model


def user_error(capsys, main, argv: list[str]) -> str:
    """Run a command that must refuse its input: exit 2, one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def no_model_load_refusal(*args, **kwargs):
    raise AssertionError("the model loaded before the arguments were checked")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail a test whose command loads a model: its error must be found before that."""
    for module in (eval_cli, bench, demo, calibrate):
        monkeypatch.setattr(module, "load_model", no_model_load_refusal)
    monkeypatch.setattr(eval_cli, "load_fixture", no_model_load_refusal)


# kvc-eval: arguments


@pytest.mark.parametrize("ratios", ["1.5,-0.5,nan", "0.5,1", "inf", ","])
def test_eval_refuses_ratios_outside_0_1(capsys, tmp_path, no_model_load, ratios):
    err = user_error(capsys, eval_cli.main, ["--ratios", ratios, "--out", str(tmp_path / "out")])
    assert err.startswith("kvc-eval: error: --ratios must be finite numbers in [0, 1)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--context", "-5"], "--context must be at least 1"),
    (["--methods", "nope"], "unknown methods nope"),
    (["--tasks", "qa"], "unknown tasks qa"),
    (["--methods", ","], "--methods is empty"),
    (["--model", FIXTURE_MODEL, "--context", "512"], "drop --context"),
    (["--model", FIXTURE_MODEL, "--query-aware"], "drop --query-aware"),
    (["--method-option", "filters=x.safetensors"], "must look like METHOD:KEY=VALUE"),
    (["--methods", "knorm", "--method-option", "qfilters:filters=x"], "'qfilters' is not among --methods (knorm)"),
    (["--method-option", "snapkv:window_size"], "must look like KEY=VALUE"),
])
def test_eval_refuses_bad_arguments_before_loading(capsys, tmp_path, no_model_load, argv, message):
    err = user_error(capsys, eval_cli.main, [*argv, "--out", str(tmp_path / "out")])
    assert message in err


def test_eval_refuses_an_out_that_is_a_file(capsys, tmp_path, no_model_load):
    (tmp_path / "out").write_text("")
    assert "is a file" in user_error(capsys, eval_cli.main, ["--out", str(tmp_path / "out")])


# kvc-eval: a results folder holds one model and one setting

FIXTURE_GRID = ["--model", FIXTURE_MODEL, "--methods", "knorm", "--ratios", "0.5", "--samples", "1",
                "--path", "reference"]


def test_eval_refuses_to_resume_a_folder_of_another_model(capsys, tmp_path):
    out = tmp_path / "out"
    assert eval_cli.main([*FIXTURE_GRID, "--out", str(out)]) == 0
    capsys.readouterr()
    saved = json.loads((out / "settings.json").read_text())
    assert saved["model"]["name"] == FIXTURE_MODEL and saved["model"]["layers"] == 2
    assert saved["model"]["dtype"] == "float32" and saved["path"] == "reference"
    # Another model (refused before it loads) and another path name the differing keys and the fix.
    err = user_error(capsys, eval_cli.main, ["--model", "smollm2-135m", "--out", str(out)])
    assert "model.name (was \"retrieval-fixture\", now \"smollm2-135m\")" in err and "new --out" in err
    err = user_error(capsys, eval_cli.main, [*FIXTURE_GRID[:-1], "compiled", "--out", str(out)])
    assert "path (was \"reference\", now \"compiled\")" in err
    # A method option given on the command line is recorded, so the folder is not resumed without it.
    err = user_error(capsys, eval_cli.main, [*FIXTURE_GRID, "--method-option", "knorm:seed=1", "--out", str(out)])
    assert "method_options.knorm (was \"(not recorded)\", now {\"seed\": 1})" in err


def test_grid_refuses_a_folder_of_another_architecture(tmp_path):
    grid = dict(methods=["knorm"], ratios=[0.5], tasks=[FIXTURE_TASK], samples=1, path="reference")
    run_grid(load_fixture(), FixtureTasks(), tmp_path, **grid)
    other = tiny_model("llama", attn_implementation="kvc", vocab_size=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"model\.layers \(was 2, now 1\)"):
        run_grid(other, FixtureTasks(), tmp_path, **grid)
    with pytest.raises(ValueError, match=r'model\.name \(was "\(not recorded\)", now "x"\)'):
        run_grid(load_fixture(), FixtureTasks(), tmp_path, model_settings={"name": "x"}, **grid)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00settings", b"[1, 2]"])
def test_eval_names_a_corrupt_settings_file(capsys, tmp_path, no_model_load, content):
    (tmp_path / "settings.json").write_bytes(content)
    err = user_error(capsys, eval_cli.main, [*FIXTURE_GRID, "--out", str(tmp_path)])
    assert str(tmp_path / "settings.json") in err


def test_eval_names_a_corrupt_record_and_repairs_a_cut_last_line(capsys, tmp_path):
    out = tmp_path / "out"
    assert eval_cli.main([*FIXTURE_GRID, "--samples", "2", "--out", str(out)]) == 0
    cell = out / "cells" / f"knorm__0.5__{FIXTURE_TASK}.jsonl"
    first, second = cell.read_text().splitlines()
    # A run killed while writing its second record: the rerun drops the cut line and redoes it.
    cell.write_text(first + "\n" + second[:10])
    assert eval_cli.main([*FIXTURE_GRID, "--samples", "2", "--out", str(out)]) == 0
    assert cell.read_text() == first + "\n" + second + "\n"
    capsys.readouterr()
    cell.write_text("garbage\n" + first + "\n")
    err = user_error(capsys, eval_cli.main, [*FIXTURE_GRID, "--samples", "2", "--out", str(out)])
    assert f"{cell}:1 is not a record" in err
    cell.write_bytes(b"\xff" + first.encode() + b"\n")
    assert str(cell) in user_error(capsys, eval_cli.main, [*FIXTURE_GRID, "--out", str(out)])
    assert read_records(out / "cells" / "missing.jsonl") == []


# kvc-bench


@pytest.mark.parametrize("argv, message", [
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--context", "0"], "--context must be at least 1"),
    (["--compression-ratio", "nan"], "--compression-ratio must be a finite number"),
    (["--method", "nope"], "nope"),
    (["--option", "window_size"], "KEY=VALUE"),
    (["--option", "compression_ratio=0.3"], "use --compression-ratio"),
    (["--method", "morphkv"], "give budget"),
    (["--budget", "0"], "--budget must be at least 1"),
    (["--layers", "2"], "--weights random only"),
    (["--weights", "random", "--model", "./ckpt"], "not a preset"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--bandwidth-mib", "0"], "--bandwidth-mib must be at least 1"),
    (["--compression-ratio", "0.5,abc"], "--compression-ratio: 'abc' is not a number"),
    (["--compression-ratio", "0.5,inf"], "--compression-ratio must be a finite number"),
    (["--compression-ratio", ","], "--compression-ratio is empty"),
    (["--method", "snapkv,nope"], "nope"),
    (["--method", "snapkv,snapkv"], "given twice"),
    (["--method", "snapkv,knorm", "--option", "window_size=8"], "'window_size' for method 'knorm'"),
])
def test_bench_refuses_bad_arguments_before_loading(capsys, no_model_load, argv, message):
    assert message in user_error(capsys, bench.main, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this build has a GPU")
def test_bench_refuses_cuda_on_a_cpu_build(capsys, no_model_load):
    assert "sees no CUDA GPU" in user_error(capsys, bench.main, ["--device", "cuda"])


def test_a_gpu_number_beyond_the_machines_is_refused(monkeypatch):
    from kvc_compile.cli.common import UsageError, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="has 1 CUDA GPU"):
        check_device("cuda:5")


def test_bench_checks_out_before_the_work(capsys, tmp_path, no_model_load):
    (tmp_path / "file").write_text("")
    err = user_error(capsys, bench.main, ["--out", str(tmp_path / "file" / "sub" / "bench.md")])
    assert "is a file, so the folder cannot be created" in err
    assert "is a folder" in user_error(capsys, bench.main, ["--out", str(tmp_path)])


def test_bench_options_parse_strings_and_budgets():
    assert bench.bench_options("adakv", None, None, ["scorer=tova", "alpha_safeguard=0.3"]) == {
        "method": "adakv", "scorer": "tova", "alpha_safeguard": 0.3, "compression_ratio": 0.5}
    assert bench.bench_options("morphkv", None, 64, []) == {"method": "morphkv", "budget": 64}
    assert bench.bench_options("kqsvd", None, None, ["projections=p.safetensors"]) == {
        "method": "kqsvd", "projections": "p.safetensors"}


def test_bench_budget_and_ratio_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--budget", "8", "--compression-ratio", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_random_weights_need_no_checkpoint(capsys, monkeypatch, tmp_path):
    """MorphKV with a budget on a 1-layer random SmolLM2 (the measurement itself is test_bench's)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = {}

    def fake_bench(model, input_ids, options, new_tokens, repeats, inductor, engine, progress=False, **kwargs):
        seen.update(layers=model.config.num_hidden_layers, options=options, shape=tuple(input_ids.shape))
        return [SpeedResult("transformers, full cache", 1.0, 0.1, 10.0, 100, None)]

    monkeypatch.setattr(bench, "bench_variants", fake_bench)
    out = tmp_path / "new" / "bench.md"
    argv = ["--weights", "random", "--layers", "1", "--method", "morphkv", "--budget", "40", "--context", "32",
            "--out", str(out)]
    assert bench.main(argv) == 0
    assert seen == {"layers": 1, "options": [{"method": "morphkv", "budget": 40}], "shape": (1, 32)}
    assert "morphkv with a budget of 40" in out.read_text()
    assert "loading smollm2-135m (random weights)" in capsys.readouterr().err


def test_bench_runs_every_method_at_every_ratio_on_a_batch(capsys, monkeypatch, tmp_path):
    """Two methods at two ratios, two prompt rows: one row per kvc variant, each variant's options on a
    line of its own, and the bound's columns and legend (the byte counts themselves are test_bench's)."""
    monkeypatch.setattr(bench, "load_model", lambda *args, **kwargs: (tiny_model("llama"), None))
    out = tmp_path / "bench.md"
    argv = ["--method", "knorm,streamingllm", "--compression-ratio", "0.5,0.75", "--batch", "2", "--context", "32",
            "--new-tokens", "1", "--repeats", "1", "--bandwidth-mib", "1", "--option", "inner_backend=eager",
            "--out", str(out)]
    assert bench.main(argv) == 0
    lines = out.read_text().splitlines()
    assert lines[0].endswith("32-token prompt × 2 rows, 1 new tokens, knorm, streamingllm at ratios 0.5, 0.75")
    rows = [line.split("|")[1].strip() for line in lines[4:] if line.startswith("| ")]
    assert rows == ["transformers, full cache", "kvc: knorm, ratio 0.5", "kvc: knorm, ratio 0.75",
                    "kvc: streamingllm, ratio 0.5", "kvc: streamingllm, ratio 0.75"]
    assert "| bytes/step | bound ms | of bound | speedup vs full cache |" in lines[2]
    options = [line for line in lines if line.startswith("- options of kvc: ")]
    assert options[1] == ('- options of kvc: knorm, ratio 0.75: `{"method": "knorm", "inner_backend": "eager", '
                          '"compression_ratio": 0.75}`') and len(options) == 4
    assert any(line.startswith("Bound: ") and "GB/s" in line for line in lines)
    assert lines[-3].startswith("- machine: ") and lines[-1].startswith("- wall time: ")


def test_bench_says_what_it_compiles_before_it_does(capsys, monkeypatch):
    from kvc_compile.bench import speed

    announced = []
    monkeypatch.setattr(speed, "measure", lambda variant, *args: announced.append(args[-1]) or SpeedResult(
        variant, 1.0, 0.1, 10.0, 100, None, 100.0))
    speed.bench_variants(tiny_model("llama"), torch.ones(1, 8, dtype=torch.long), {"method": "knorm"}, 2, 1,
                         inductor_baseline=True, progress=True, bandwidth_bytes=1 << 20)
    assert [line is not None and "compiling (first call; this takes a while)" in line for line in announced] == [
        False, True, True]
    # measure prints the line on stderr before its warm-up.
    monkeypatch.undo()
    model = tiny_model("llama")
    from transformers import DynamicCache

    speed.measure("x", model, DynamicCache, torch.ones(1, 4, dtype=torch.long), 1, 1, announce="warming up x")
    assert "warming up x" in capsys.readouterr().err


# kvc-demo


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--context-tokens", "0"], "--context-tokens must be at least 1"),
    (["--option", "compression_ratio=0.3"], "use --compression-ratio"),
    (["--compression-ratio", "1.5"], "compression_ratio must be a number in [0, 1)"),
    (["--method", "morphkv"], "give budget"),
])
def test_demo_refuses_bad_arguments_before_loading(capsys, no_model_load, argv, message):
    assert message in user_error(capsys, demo.main, argv)


def test_demo_takes_float_and_string_options(capsys, monkeypatch):
    def stop(name, **kwargs):
        raise ModelNotFoundError(f"stop at loading {name}")

    monkeypatch.setattr(demo, "load_model", stop)
    argv = ["--method", "adakv", "--option", "alpha_safeguard=0.3", "--option", "scorer=tova"]
    assert "stop at loading smollm2-135m" in user_error(capsys, demo.main, argv)
    assert "stop at loading" in user_error(capsys, demo.main, ["--method", "morphkv", "--budget", "64"])


# kvc-calibrate


@pytest.mark.parametrize("argv, message", [
    (["--sequences", "0"], "--sequences must be at least 1"),
    (["--sequence-tokens", "0"], "--sequence-tokens must be at least 1"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--max-error", "nan"], "--max-error must be a finite number"),
    (["--max-error", "1.5"], "--max-error must be in [0, 1)"),
    (["--method", "qfilters", "--rank", "4"], "Q-Filters keep one direction per head, drop --rank"),
])
def test_calibrate_refuses_bad_arguments_before_loading(capsys, tmp_path, no_model_load, argv, message):
    assert message in user_error(capsys, calibrate.main, [*argv, "--out", str(tmp_path / "p.safetensors")])


def test_calibrate_checks_its_files_before_loading(capsys, tmp_path, no_model_load):
    err = user_error(capsys, calibrate.main, ["--out", str(tmp_path / "missing" / "p.safetensors")])
    assert "does not exist; create it first" in err
    assert "is a folder" in user_error(capsys, calibrate.main, ["--out", str(tmp_path)])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    err = user_error(capsys, calibrate.main, ["--text", str(latin), "--out", str(tmp_path / "p.safetensors")])
    assert f"--text {latin} is not UTF-8" in err
    err = user_error(capsys, calibrate.main, ["--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "p")])
    assert "nope.txt: no such file" in err
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"a file the user owns")
    assert "pass --force to replace it" in user_error(capsys, calibrate.main, ["--out", str(existing)])
    assert existing.read_bytes() == b"a file the user owns"


def test_projections_are_saved_whole_and_shareable(tmp_path):
    """Saved beside and renamed into place (no temporary file left), with the mode ``open`` gives."""
    import os

    from conftest import random_prompt, tiny_model

    from kvc_compile.compression.lowrank import LowRankProjections
    from kvc_compile.eval.lowrank import calibrate_lowrank

    path = tmp_path / "p.safetensors"
    model = tiny_model("llama")
    calibrate_lowrank(model, [random_prompt(1, 32)], rank=4).save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]
    assert LowRankProjections.load(path, model).key_ranks == [4, 4]


# Model loading


def test_a_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./ckpt", str(tmp_path / "ckpt"), "~/kvc-no-such-ckpt", "a/b/c", "runs/ckpt"):
        with pytest.raises(ModelNotFoundError, match="does not exist") as error:
            load_model(name)
        assert "huggingface-cli" not in str(error.value), name
    with pytest.raises(ModelNotFoundError, match=r"not a preset \(smollm2-135m.*looks like org/name"):
        load_model("smollm3")


def test_a_hub_id_not_in_the_cache_suggests_its_download(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download kvc-test/no-such-model") as error:
        load_model("kvc-test/no-such-model")
    assert "--weights random" not in str(error.value)  # only a preset has an architecture to build


def test_unknown_presets_are_listed():
    with pytest.raises(ModelNotFoundError, match=r"presets: smollm2-135m, mistral-7b"):
        load_model("nope", weights="random")


def test_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file; pass the checkpoint directory"):
        load_model(str(tmp_path / "weights.safetensors"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelNotFoundError, match="does not load"):
        load_model(str(tmp_path))


def test_a_checkpoint_without_a_tokenizer(tmp_path, caplog):
    tiny_model("llama").save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))  # what kvc-build needs: engines run on token ids
    assert tokenizer is None and model.config.num_hidden_layers == 2
    assert "has no tokenizer files; loaded without a tokenizer" in caplog.text
    with pytest.raises(ModelNotFoundError, match="has no tokenizer files .* copy the tokenizer files"):
        load_model(str(tmp_path), require_tokenizer=True)


@pytest.mark.smollm2  # SmolLM2's tokenizer; the model is a tiny random Llama
@pytest.mark.parametrize("argv", [["--method", "morphkv", "--budget", "40", "--option", "window_size=8"],
                                  ["--method", "adakv", "--option", 'scorer_options={"window_size": 8}']])
def test_demo_runs_methods_that_need_the_compressed_cache(capsys, monkeypatch, smollm2, argv):
    """MorphKV compresses while decoding and AdaKV packs its cache: both need a CompressedCache."""
    tokenizer = smollm2[1]
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=1)
    monkeypatch.setattr(demo, "load_model", lambda *args, **kwargs: (model, tokenizer))
    assert demo.main([*argv, "--samples", "1", "--context-tokens", "64", "--inner-backend", "eager"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "compressed back to 40 while decoding" in out if "morphkv" in argv else "after prefill: [" in out


def test_a_refusal_of_the_kvc_pass_is_one_line(capsys):
    """Dynamo wraps what the backend raises; a refusal inside it is still a user error."""
    from torch._dynamo.exc import BackendCompilerFailed

    from kvc_compile.cli.common import user_errors
    from kvc_compile.passes.prefill_compression import CacheLayoutError

    @user_errors("kvc-x")
    def refused(argv: list[str]) -> int:
        raise BackendCompilerFailed(refused, CacheLayoutError("kvc: use a CompressedCache"), None)

    assert user_error(capsys, refused, []) == "kvc-x: error: kvc: use a CompressedCache"

    @user_errors("kvc-x")
    def bug(argv: list[str]) -> int:
        raise BackendCompilerFailed(bug, KeyError("a bug"), None)

    with pytest.raises(BackendCompilerFailed):
        bug([])


def test_kvc_debug_shows_the_traceback_of_a_user_error(capsys, no_model_load, monkeypatch):
    assert "--samples must be at least 1" in user_error(capsys, demo.main, ["--samples", "0"])
    monkeypatch.setenv("KVC_DEBUG", "1")
    with pytest.raises(ValueError, match="--samples must be at least 1"):
        demo.main(["--samples", "0"])


def test_bench_tune_decode_reaches_the_measurement_and_the_title(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = {}

    def fake_bench(model, input_ids, options, new_tokens, repeats, inductor, engine, progress=False, **kwargs):
        seen.update(tune_decode=kwargs.get("tune_decode"), inductor=inductor)
        return [SpeedResult("transformers, full cache", 1.0, 0.1, 10.0, 100, None)]

    monkeypatch.setattr(bench, "bench_variants", fake_bench)
    out = tmp_path / "bench.md"
    argv = ["--weights", "random", "--layers", "1", "--context", "32", "--inductor-baseline", "--tune-decode",
            "--out", str(out)]
    assert bench.main(argv) == 0
    assert seen == {"tune_decode": True, "inductor": True}
    assert out.read_text().splitlines()[0].endswith(", decode graphs tuned (max-autotune, frozen weights)")


def test_tune_decode_is_refused_for_engines_inductor_does_not_compile(capsys, no_model_load, monkeypatch, tmp_path):
    message = user_error(capsys, bench.main, ["--tune-decode", "--engine", "onnx"])
    assert "--tune-decode" in message and "--engine aoti" in message
    from kvc_compile.cli import build as build_cli

    monkeypatch.setattr(build_cli, "load_model", no_model_load_refusal)
    message = user_error(capsys, build_cli.main, ["--model", "smollm2-135m", "--method", "snapkv", "--tune-decode",
                                                  "--target", "exported", "--out", str(tmp_path / "engine")])
    assert "tune_decode" in message and "--target aoti" in message
