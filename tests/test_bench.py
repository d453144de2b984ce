"""kvc-bench's measurement loop on a tiny model: every variant timed, the cache bytes measured, each
decode step judged against the memory-bandwidth bound."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile.bench.speed import MiB, bench_variants, live_kv_bytes, markdown, memory_bandwidth, weight_bytes
from kvc_compile.cli.bench import engine_contexts
from kvc_compile.cli.common import UsageError

# The tiny Llama (conftest.TINY): vocabulary 96, hidden 64, MLP 128, 2 layers, 2 KV heads of 16.
EMBEDDING = 96 * 64
LAYER = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; gate, up, down; 2 norms
TINY_WEIGHT_BYTES = 4 * (2 * EMBEDDING + 2 * LAYER + 64)  # embedding and lm_head untied, 2 layers, final norm


def test_variants_side_by_side_and_the_cache_halves():
    model = tiny_model("llama")
    batch, prompt, new_tokens = 2, 64, 4
    ids = random_prompt(batch, prompt)
    options = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 8, "inner_backend": "eager"}
    # The engine is built for prompts twice as long: it still reports (and reads) this prompt's entries only.
    results = bench_variants(model, ids, options, new_tokens=new_tokens, repeats=1, engine_target="exported",
                             bandwidth_bytes=MiB, engine_max_contexts=(2 * prompt,))
    assert [r.variant for r in results] == ["transformers, full cache", "kvc: snapkv",
                                            "engine (exported, built for 128-token prompts): snapkv"]
    full, kvc, engine = results
    assert all(r.prefill_s > 0 and r.decode_tokens_per_s > 0 and r.decode_ms_per_step > 0 for r in results)
    # Keys and values of 32 of 64 tokens, plus the int32 position and head of each kept entry.
    kv_heads, head_dim, layers = 2, 16, 2
    assert full.cache_bytes == batch * layers * 2 * kv_heads * 64 * head_dim * 4
    assert kvc.cache_bytes == full.cache_bytes // 2 + batch * layers * 2 * kv_heads * 32 * 4
    # The engine's dense layers return the kept entries' positions only (their heads are implicit).
    assert engine.cache_bytes == full.cache_bytes // 2 + batch * layers * kv_heads * 32 * 4
    assert engine.compile_s > engine.prefill_s  # the build is part of its warm-up
    # What a decode step reads: the weights, the live keys and values (the compressed cache's without
    # its positions and heads; the engine's as it reports them), and half the new tokens' growth.
    token = 2 * layers * batch * kv_heads * head_dim * 4
    assert full.bound.weight_bytes == TINY_WEIGHT_BYTES and full.bound.token_bytes == token
    assert full.step_bytes == TINY_WEIGHT_BYTES + full.cache_bytes + new_tokens // 2 * token
    assert kvc.step_bytes == TINY_WEIGHT_BYTES + full.cache_bytes // 2 + new_tokens // 2 * token
    assert engine.step_bytes == TINY_WEIGHT_BYTES + engine.cache_bytes + new_tokens // 2 * token
    assert math.isclose(full.bound_ms, 1000 * full.step_bytes / full.bound.bandwidth)
    assert kvc.kind == "compiled" and engine.kind == "engine" and not kvc.full_cache
    table = markdown(results, "tiny")
    assert table[4].startswith("| transformers, full cache |") and "1.00×" in table[4]
    header = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert header[-7:] == ["decode ms/step", "bytes/step", "bound ms", "of bound", "speedup vs full cache",
                           "bound's ratio", "of bound's ratio"]
    row = [cell.strip() for cell in table[5].strip("|").split("|")]
    assert row[header.index("bytes/step")] == f"{kvc.step_bytes:,}"
    bound_ratio = full.bound_ms / kvc.bound_ms
    assert row[header.index("bound's ratio")] == f"{bound_ratio:.3g}×"
    assert table[4].endswith("| — | — | — |")  # the full cache is the reference
    assert any(line.startswith("Bound: ") and "GB/s" in line for line in table)
    assert any(line.startswith("Engines: ") for line in table)
    assert model.config._attn_implementation == "sdpa"  # restored after the kvc variant


def test_weights_count_each_storage_once():
    assert weight_bytes(tiny_model("llama")) == TINY_WEIGHT_BYTES
    # A tied lm_head is the embedding: read once per step, counted once.
    assert weight_bytes(tiny_model("llama", tie_word_embeddings=True)) == TINY_WEIGHT_BYTES - 4 * EMBEDDING


def test_live_cache_bytes_count_the_tensors_not_their_storage():
    buffer = torch.zeros(2, 2, 100, 16)  # preallocated; the layer's keys and values are views of 10 entries
    packed = torch.zeros(2, 1, 7, 16, dtype=torch.float16)  # [batch, 1, T, d]: every head's entries in one run
    layers = [SimpleNamespace(keys=buffer[:, :, :10], values=buffer[:, :, 50:60]),
              SimpleNamespace(keys=packed, values=packed.clone()),
              SimpleNamespace(keys=None, values=None)]  # not yet filled
    assert live_kv_bytes(SimpleNamespace(layers=layers)) == 2 * (2 * 2 * 10 * 16 * 4) + 2 * (2 * 7 * 16 * 2)


def test_memory_bandwidth_is_a_positive_rate():
    bandwidth = memory_bandwidth("cpu", 4 * MiB, repeats=3)
    assert math.isfinite(bandwidth) and bandwidth > 0



@pytest.mark.parametrize("text, engine, message", [
    ("256", None, "add --engine"), ("32", "aoti", "at least --context"), ("x", "aoti", "'x' is not a prompt length"),
])
def test_engine_max_context_needs_an_engine_and_room_for_the_prompt(text, engine, message):
    assert engine_contexts(None, None, 64) == [] and engine_contexts("64,256", "aoti", 64) == [64, 256]
    with pytest.raises(UsageError, match=message):
        engine_contexts(text, engine, 64)


def test_the_gpu_kernel_benchmark_runs_every_path_in_a_dry_run(tmp_path):
    """benchmarks/kernels_gpu.py is run on a GPU only when one is lent: its dry run (tiny shapes, this
    device) checks beforehand that every path, AdaKV's head-adaptive selection included, runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "kernels_gpu.py"
    spec = importlib.util.spec_from_file_location("kernels_gpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "kernels.md"
    assert script.main(["--dry-run", "--batch", "2", "--out", str(out)]) == 0
    report = out.read_text()
    assert "a dry run: the numbers mean nothing" in report and "batch 2" in report
    for path_name in ("snapkv, reference", "snapkv, kvpress-style", "adakv over snapkv, reference",
                      "SDPA, dense, full cache", "packed, half the entries"):
        assert sum(f"| {path_name}" in line for line in report.splitlines()) == 2, path_name  # both contexts
