"""The in-place decode path: storage with room to grow, written in place, read with native GQA."""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_greedy_steps, random_prompt, tiny_model
from torch._dynamo.utils import counters
from transformers import DynamicCache

import kvc_compile.cache as cache_module
from kvc_compile import CompressedCache, reference_generate
from kvc_compile.passes import manager as pass_manager
from kvc_compile.transformers_compat import with_cache

PROMPT = 40


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_prompt(2, PROMPT)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


def store_pointers(cache) -> list[int]:
    return [layer._stores["keys"].data_ptr() for layer in cache.layers]


def recorded_decode_graphs(monkeypatch) -> list[str]:
    """The code of every decode graph the kvc passes rewrite from now on (prefill graphs are left out)."""
    codes: list[str] = []
    run = pass_manager.PassManager.run

    def recording_run(self, gm):
        prefill = run(self, gm)
        if not prefill:
            codes.append(gm.code)
        return prefill

    monkeypatch.setattr(pass_manager.PassManager, "run", recording_run)
    return codes


def test_growth_keeps_free_room_and_steps_of_a_fixed_size():
    step = cache_module.GROWTH_STEP
    assert cache_module.grown_capacity(1) == 2 * step
    assert cache_module.grown_capacity(step - 1) == 2 * step
    assert cache_module.grown_capacity(step) == 3 * step  # never fewer than a step of free entries


SMALL_WINDOW = {"snapkv": {"window_size": 4}, "adakv": {"scorer_options": {"window_size": 4}}}


@pytest.mark.parametrize(("method", "extra"), sorted(SMALL_WINDOW.items()))
def test_compiled_decode_writes_in_place_and_grows_by_steps(monkeypatch, method, extra):
    """Dense (SnapKV) and packed (AdaKV) layers: between growths a step writes into the same storage;
    storage grows only when full, by whole steps; tokens equal the reference; the graphs do not
    multiply with the steps."""
    monkeypatch.setattr(cache_module, "GROWTH_STEP", 4)  # read when a decode graph is traced
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    options = {"method": method, "compression_ratio": 0.5, "inner_backend": "eager", **extra}
    steps = 14
    expected = reference_generate(model, ids, options, max_new_tokens=steps + 1, attention_mask=mask)
    counters.clear()
    tokens, cache, lengths, _ = compiled_greedy_steps(model, options, ids, mask, steps)
    assert torch.equal(tokens, expected[:, :steps])
    layer = cache.layers[0]
    assert layer.packed == (method == "adakv")
    assert layer.storage_capacity() % 4 == 0 and layer.storage_capacity() > layer.physical_length
    # Prefill, the first step (into storage), steady steps static then dynamic, and one graph for any
    # later growth: a bounded number however many steps run.
    assert counters["stats"]["unique_graphs"] <= 5
    if layer.packed:  # the new entries are labelled with their KV heads, token-major
        kv_heads = model.config.num_key_value_heads
        assert torch.equal(layer.heads[0, 0, -kv_heads:], torch.arange(kv_heads))
        assert torch.equal(layer.positions[0, 0, -kv_heads:], torch.full((kv_heads,), PROMPT + steps - 1))
    else:
        assert torch.equal(layer.positions[0, 0, -3:], torch.arange(PROMPT + steps - 3, PROMPT + steps))


def test_storage_is_not_reallocated_between_steps_within_capacity():
    model = tiny_model("qwen2", attn_implementation="kvc")
    ids, mask = padded_batch()
    options = {"method": "snapkv", "compression_ratio": 0.5, "inner_backend": "eager", "window_size": 4}
    compiled = torch.compile(model, backend="kvc", options=options, dynamic=True)
    cache = CompressedCache()
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask, **with_cache(cache), use_cache=True)
        token, pointers = out.logits[:, -1:].argmax(-1), []
        for _ in range(8):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=-1)
            out = compiled(token, attention_mask=mask, **with_cache(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            pointers.append(store_pointers(cache))
    assert all(pointer == pointers[0] for pointer in pointers)  # one storage per layer for all 8 steps
    assert cache.layers[0].physical_length == PROMPT // 2 + 8


def test_inductor_decode_in_place_matches_the_reference():
    """The default inner backend on a left-padded batch: same tokens, storage written in place."""
    model = tiny_model("mistral")
    ids, mask = padded_batch()
    options = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 4}
    expected = reference_generate(model, ids, options, max_new_tokens=6, attention_mask=mask)
    model.compile(backend="kvc", options=options)
    cache = CompressedCache()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **with_cache(cache))
    assert torch.equal(out[:, PROMPT:], expected)
    layer = cache.layers[0]
    assert layer.storage_capacity() > layer.physical_length == PROMPT // 2 + 5


def test_eager_cache_in_place_equals_dynamic_cache_under_beam_search():
    """Uncompressed, the in-place cache is transformers' cache: beam search reorders it (assigning new
    tensors, which become its storage, and later steps grow them), with the same results."""
    model = tiny_model("llama")
    ids = random_prompt(1, 12)
    with torch.no_grad():
        kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=2)
        expected = model.generate(ids, **kwargs, **with_cache(DynamicCache()))
        cache = CompressedCache()
        got = model.generate(ids, **kwargs, **with_cache(cache))
    assert torch.equal(got, expected)
    assert cache.layers[0].positions.shape[-1] == cache.layers[0].physical_length


def test_decode_graph_reads_the_cache_once_with_native_gqa(monkeypatch):
    """Under a mask, transformers repeats the cache per query head (``repeat_kv``); the pass removes the
    repeat: the decode graph's attention reads the cached tensors with the query group as rows."""
    codes = recorded_decode_graphs(monkeypatch)
    model = tiny_model("llama")
    ids, mask = padded_batch()
    options = {"method": "snapkv", "compression_ratio": 0.5, "inner_backend": "eager", "window_size": 4}
    expected = reference_generate(model, ids, options, max_new_tokens=4, attention_mask=mask)
    tokens, *_ = compiled_greedy_steps(model, options, ids, mask, 3)
    assert torch.equal(tokens, expected[:, :3])
    assert codes and all(code.count("torch.unflatten") == 2 for code in codes)  # both layers grouped
    assert not any(".expand(" in line and "keys" in line for code in codes for line in code.splitlines())


def test_engine_decode_program_reads_its_buffers_with_native_gqa(monkeypatch, tmp_path):
    """The engine's fixed-capacity decode program goes through the same pass: no repeat of its buffers."""
    from kvc_compile.engine import Engine, build

    codes = recorded_decode_graphs(monkeypatch)
    model = tiny_model("llama")
    ids = random_prompt(1, PROMPT)
    options = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 4}
    build(model, options, tmp_path / "engine", target="exported", max_context=64, max_new_tokens=6, progress=False)
    assert len(codes) == 1 and codes[0].count("torch.unflatten(") == model.config.num_hidden_layers
    assert "aten.expand" not in codes[0]
    expected = reference_generate(model, ids, options, max_new_tokens=6)
    engine = Engine.load(tmp_path / "engine", trusted=True)
    assert engine.generate(ids.tolist(), 6, stop_on_eos=False).tokens == expected.tolist()


@pytest.mark.parametrize("method_options", [
    {"method": "snapkv", "window_size": 8},
    pytest.param({"method": "adakv", "scorer_options": {"window_size": 8}}, marks=pytest.mark.extended),
], ids=["snapkv", "adakv"])
def test_tuned_decode_graph_keeps_the_reference_tokens(monkeypatch, capfd, method_options):
    """``tune_decode``: decode graphs, and only they, are compiled with max-autotune and frozen weights
    (``compile_tuned``), and generate the reference's tokens, for a packed layout too."""
    import kvc_compile.backend as backend

    tuned = []

    def spy(gm, example_inputs):
        tuned.append(gm)
        return compile_tuned(gm, example_inputs)

    compile_tuned = backend.compile_tuned
    monkeypatch.setattr(backend, "compile_tuned", spy)
    model = tiny_model("llama", attn_implementation="kvc")
    ids = random_prompt(2, PROMPT)
    options = {**method_options, "compression_ratio": 0.5, "tune_decode": True}
    expected = reference_generate(model, ids, options, max_new_tokens=5)
    tokens, cache, _, _ = compiled_greedy_steps(model, options, ids, torch.ones_like(ids), steps=5)
    assert torch.equal(tokens, expected[:, :5])
    assert cache.layers[0].packed == (method_options["method"] == "adakv")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("kvc: compiling")]
    decode_lines = [line for line in lines if "decode graph" in line]
    assert decode_lines and all("inductor, tuned)" in line for line in decode_lines), lines
    assert not any("prefill graph" in line and "tuned" in line for line in lines), lines
    assert len(tuned) == len(decode_lines), (len(tuned), lines)
