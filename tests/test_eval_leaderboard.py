"""The leaderboard grid: answers through the compressed cache, resumes where it stopped, never
recomputes a finished cell, and writes its table, CSV, JSON and plot."""

import json

import pytest
import torch
from conftest import tiny_model

import kvc_compile.eval.leaderboard as leaderboard
from kvc_compile.eval.leaderboard import FULL_CACHE, TextTasks, run_grid, summarize
from kvc_compile.eval.lowrank import calibrate_lowrank
from kvc_compile.eval.tasks import make_sample

pytestmark = pytest.mark.smollm2  # needs a real tokenizer (SmolLM2's); the model is a tiny random Llama


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture
def model(tokenizer):
    model = tiny_model("llama", attn_implementation="kvc", vocab_size=len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model


GRID = dict(methods=["snapkv"], ratios=[0.5], tasks=["passkey"], samples=2,
            extra_options={"snapkv": {"window_size": 8, "inner_backend": "eager"}})


def test_compiled_and_reference_answers_agree(model, tokenizer):
    sample = make_sample(tokenizer, "niah_single", 160, seed=0)
    options = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 8, "inner_backend": "eager"}
    reference = leaderboard.answer(model, tokenizer, sample, options, path="reference")
    model.compile(backend="kvc", options=options, dynamic=True)
    try:
        compiled = leaderboard.answer(model, tokenizer, sample, options, path="compiled")
    finally:
        model._compiled_call_impl = None
    assert compiled == reference and len(reference) > 0


def test_grid_resumes_and_never_recomputes_finished_cells(model, tokenizer, tmp_path, monkeypatch):
    cells = run_grid(model, TextTasks(tokenizer, 160), tmp_path, **GRID)
    files = sorted((tmp_path / "cells").glob("*.jsonl"))
    assert [f.name for f in files] == ["full_cache__0__passkey.jsonl", "snapkv__0.5__passkey.jsonl"]
    assert all(len(f.read_text().splitlines()) == 2 for f in files)
    # Interrupt one cell after its first sample; count what a rerun computes.
    first = files[1].read_text().splitlines()[0]
    files[1].write_text(first + "\n")
    calls, original = [], leaderboard.answer
    monkeypatch.setattr(leaderboard, "answer", lambda *a, **k: calls.append(a[2].seed) or original(*a, **k))
    run_grid(model, TextTasks(tokenizer, 160), tmp_path, **GRID)
    assert calls == [1]  # only the missing sample, of the interrupted cell
    assert files[1].read_text().splitlines()[0] == first
    calls.clear()
    run_grid(model, TextTasks(tokenizer, 160), tmp_path, **GRID)
    assert calls == []
    with pytest.raises(ValueError, match="other settings"):
        run_grid(model, TextTasks(tokenizer, 200), tmp_path, **GRID)

    results = summarize(tmp_path, cells, "tiny")
    assert {(r.method, r.ratio) for r in results} == {(FULL_CACHE, 0.0), ("snapkv", 0.5)}
    rows = json.loads((tmp_path / "results.json").read_text())
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert rows[0]["mean"] == pytest.approx(sum(r["score"] for r in records) / 2)
    table = (tmp_path / "leaderboard.md").read_text()
    assert "| full cache | 0 |" in table and "| snapkv | 0.5 |" in table
    assert (tmp_path / "leaderboard.png").stat().st_size > 1000
    assert (tmp_path / "results.csv").read_text().startswith("method,ratio,task,mean,low,high,samples")


def test_cli_rejects_unknown_methods_and_tasks(tmp_path, capsys):
    from kvc_compile.cli.eval import main

    assert main(["--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown methods nope" in capsys.readouterr().err
    assert main(["--tasks", "qa", "--out", str(tmp_path)]) == 2
    assert "unknown tasks qa" in capsys.readouterr().err
    assert torch.is_grad_enabled()  # nothing left switched off


def test_shared_prefill_grid_records_what_the_reference_grid_does_and_resumes(model, tokenizer, tmp_path,
                                                                                monkeypatch):
    grid = dict(GRID, methods=["snapkv", "knorm"], tasks=["passkey", "niah_single"])
    run_grid(model, TextTasks(tokenizer, 160), tmp_path / "reference", path="reference", **grid)
    run_grid(model, TextTasks(tokenizer, 160), tmp_path / "shared", path="shared-prefill", **grid)
    files = sorted((tmp_path / "reference" / "cells").glob("*.jsonl"))
    assert len(files) == 6
    for file in files:
        assert (tmp_path / "shared" / "cells" / file.name).read_text() == file.read_text()
    # Interrupt one cell after its first sample: a rerun answers only that configuration's seed 1.
    cell = tmp_path / "shared" / "cells" / "knorm__0.5__niah_single.jsonl"
    cell.write_text(cell.read_text().splitlines()[0] + "\n")
    calls, original = [], TextTasks.records
    monkeypatch.setattr(TextTasks, "records", lambda self, model, task, seed, configs, query_aware:
                        calls.append((task, seed, [c["method"] for c in configs]))
                        or original(self, model, task, seed, configs, query_aware))
    run_grid(model, TextTasks(tokenizer, 160), tmp_path / "shared", path="shared-prefill", **grid)
    assert calls == [("niah_single", 1, ["knorm"])]
    assert cell.read_text() == (tmp_path / "reference" / "cells" / cell.name).read_text()


def test_kqsvd_cells_keep_entries_at_the_ratio_s_rank_on_both_paths(model, tokenizer, tmp_path):
    # A ratio removes that share of each entry's width: rank 16 of 64 at 0.75, at least 1.
    assert leaderboard.method_options("kqsvd", 0.75, {"projections": "p"}, head_dim=64) == {
        "method": "kqsvd", "key_rank": 16, "value_rank": 16, "projections": "p"}
    assert leaderboard.method_options("kqsvd", 0.99, head_dim=64)["key_rank"] == 1
    projections = tmp_path / "kqsvd.safetensors"
    calibrate_lowrank(model, [torch.randint(0, len(tokenizer), (1, 96), generator=torch.Generator().manual_seed(0))],
                      rank=8).save(projections)
    grid = dict(methods=["kqsvd"], ratios=[0.5], tasks=["passkey"], samples=2,
                extra_options={"kqsvd": {"projections": str(projections)}})
    run_grid(model, TextTasks(tokenizer, 160), tmp_path / "reference", path="reference", **grid)
    run_grid(model, TextTasks(tokenizer, 160), tmp_path / "shared", path="shared-prefill", **grid)
    cell = "kqsvd__0.5__passkey.jsonl"
    assert (tmp_path / "shared" / "cells" / cell).read_text() == (tmp_path / "reference" / "cells" / cell).read_text()
