"""Engines (kvc-build / kvc-run): programs exported with the kvc pass, against the compiled path.

Breadth runs on tiny random decoders with the ``exported`` target (the same programs, without the
C++ compile); one tiny engine goes through AOTInductor; SmolLM2 is in test_smollm2_engine.py.
"""

from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from conftest import calibrated_filters, compiled_greedy_steps, random_prompt, tiny_model
from safetensors import safe_open

from kvc_compile import lookahead_generate, reference_generate
from kvc_compile.cli.build import main as build_cli
from kvc_compile.cli.run import main as run_cli
from kvc_compile.config import CompressionConfig
from kvc_compile.engine import Engine, EngineError, build
from kvc_compile.engine.build import _prefill_ranges
from kvc_compile.engine.manifest import MANIFEST
from kvc_compile.engine.runtime import _SlotSteps
from kvc_compile.engine.state import SlotState, prefill_names, unflatten
from kvc_compile.methods import list_token_methods
from kvc_compile.models import preset_config
from kvc_compile.plugins.onnx import plugin_nodes

STEPS = 8
WINDOWED = {"snapkv", "pyramidkv", "lava", "obcache"}
SNAPKV_SCORED = {"adakv", "chunkkv", "criticalkv", "criticaladakv"}  # wrap a scorer, SnapKV by default
# LAQ decodes through lookahead_generate on the compiled path: test_laq_engine_keeps_the_compiled_tokens.
NOT_IN_ENGINES = {"laq"}
LAQ = {"method": "laq", "compression_ratio": 0.5, "window_size": 4, "stage1_options": {"window_size": 8}}
MORPHKV = {"method": "morphkv", "budget": 20, "window_size": 4}  # a constant cache of 20 entries per KV head
PERIODIC_SNAPKV = {"method": "snapkv", "budget": 16, "window_size": 4, "decoding_interval": 4, "target_size": 16}
# Read every prompt query; while decoding they score from the 6 newest (Expected Attention un-rotates
# them with the step's rotary tables).
PERIODIC_H2O = {"method": "h2o", "budget": 16, "decoding_window": 6, "decoding_interval": 4, "target_size": 16}
PERIODIC_EA = {"method": "expected_attention", "budget": 16, "decoding_window": 6, "n_future_positions": 16,
               "decoding_interval": 4, "target_size": 16}
# Un-rotates every kept key at its own position, from the step's rotary tables.
PERIODIC_COMPACTOR = {"method": "compactor", "budget": 16, "decoding_window": 6, "chunk_size": 8, "sketch_size": 8,
                      "decoding_interval": 4, "target_size": 16}


def method_options(method: str) -> dict:
    if method == "morphkv":
        return dict(MORPHKV)
    options = {"method": method, "compression_ratio": 0.5}
    if method in WINDOWED:
        options["window_size"] = 8  # short prompts still get compressed
    if method in SNAPKV_SCORED:
        options["scorer_options"] = {"window_size": 8}
    return options


def padded_batch(length: int = 40, pad: int = 5):
    ids = random_prompt(2, length)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask, [ids[0, pad:].tolist(), ids[1].tolist()]


def quiet_build(model, options, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short-prompt program warns that it keeps everything
        return build(model, options, out, progress=False, **{"max_context": 96, "max_new_tokens": 12,
                                                             "max_batch": 4, **kwargs})


# By default: a window scorer with a short-prompt program, and a scorer whose tiny prompts keep one
# entry. Pre-RoPE keys (expected_attention) and the packed layout (adakv, lava) go through the same
# export by default in test_onnx_engine.py; every other method runs with -m extended (about 30 s
# each on a 2-core CPU).
CORE_METHODS = {"snapkv", "knorm"}


@pytest.mark.parametrize("method", [
    method if method in CORE_METHODS else pytest.param(method, marks=pytest.mark.extended)
    for method in sorted(set(list_token_methods()) - NOT_IN_ENGINES)
])
def test_every_method_builds_and_keeps_the_compiled_tokens(method, tmp_path):
    options = method_options(method)
    if method == "qfilters":
        options["filters"] = calibrated_filters("llama", tmp_path)
    quiet_build(tiny_model("llama", attn_implementation="kvc"), options, tmp_path / "engine", target="exported")
    engine_tokens, compiled_tokens = engine_and_compiled_tokens(tmp_path / "engine", options)
    assert engine_tokens == compiled_tokens


def engine_and_compiled_tokens(engine_dir, options: dict, length: int = 40, steps: int = STEPS) -> tuple[list, list]:
    """Greedy tokens of a tiny-Llama engine and of the kvc-compiled model on the padded batch."""
    ids, mask, prompts = padded_batch(length)
    engine_tokens = Engine.load(engine_dir, trusted=True).generate(prompts, steps).tokens
    torch._dynamo.reset()
    compiled, *_ = compiled_greedy_steps(tiny_model("llama", attn_implementation="kvc"),
                                         {**options, "inner_backend": "eager"}, ids, mask, steps)
    return engine_tokens, compiled.tolist()


LOWRANK = {"key_rank": 6, "value_rank": 4}


# KQ-SVD alone (every token kept at rank 6/4), and after SnapKV's eviction as ONNX graphs (the
# projections become MatMuls with the factors as constants).
@pytest.mark.parametrize("options, target", [
    ({"method": "kqsvd", **LOWRANK}, "exported"),
    ({"method": "snapkv", "window_size": 8, "compression_ratio": 0.5, "kqsvd": LOWRANK}, "onnx"),
], ids=["kqsvd", "snapkv+kqsvd-onnx"])
def test_lowrank_engines_keep_the_compiled_tokens(options, target, tmp_path):
    from kvc_compile.eval.lowrank import calibrate_lowrank

    projections = tmp_path / "tiny-llama.safetensors"
    calibrate_lowrank(tiny_model("llama"), [random_prompt(1, 96, seed=9)], rank=16).save(projections)
    if options["method"] == "kqsvd":
        options = {**options, "projections": str(projections)}
    else:
        options = {**options, "kqsvd": {**options["kqsvd"], "projections": str(projections)}}
    result = quiet_build(tiny_model("llama", attn_implementation="kvc"), options, tmp_path / "engine", target=target)
    assert result.manifest.prefill[0].min_length == 2  # a one-token prompt would trace as a decode step
    engine_tokens, compiled_tokens = engine_and_compiled_tokens(tmp_path / "engine", options)
    assert engine_tokens == compiled_tokens
    engine = Engine.load(tmp_path / "engine", trusted=True)
    ids, mask, _ = padded_batch()
    outputs = engine._prefill_program(ids.shape[1])(ids, mask)
    per_layer = len(result.manifest.state_names) + 1
    assert [outputs[1 + i].shape[-1] for i in range(2)] == [6, 4]  # keys and values at their ranks
    assert outputs[1 + per_layer].shape[-1] == 6  # the second layer's keys too
    # One-token prompts are padded on the left to the shortest program's length.
    assert len(engine.generate([[5]], 3).tokens[0]) == 3


def test_laq_engine_keeps_the_compiled_tokens(tmp_path):
    """Prefill (stage 1), rollout, stage 2 and decoding as programs, here as ONNX graphs run by ONNX
    Runtime; EOS inside the rollout masked."""
    result = quiet_build(tiny_model("llama", attn_implementation="kvc"), LAQ, tmp_path / "engine", target="onnx")
    lookahead = result.manifest.lookahead
    assert lookahead["steps"] == CompressionConfig.from_options(LAQ).method_impl.lookahead
    assert [entry["max_length"] for entry in lookahead["stage2"]] == [e.max_length for e in result.manifest.prefill]
    stage2 = onnx.load(str(tmp_path / "engine" / lookahead["stage2"][-1]["file"]))
    assert [node.op_type for node in plugin_nodes(stage2)] == ["KvcLookaheadStage2"] * 2  # one per layer
    assert not plugin_nodes(onnx.load(str(tmp_path / "engine" / lookahead["rollout"])))
    engine = Engine.load(tmp_path / "engine", trusted=True)
    ids, mask, prompts = padded_batch()
    model = tiny_model("llama", attn_implementation="kvc")
    model.compile(backend="kvc", options={**LAQ, "inner_backend": "eager"}, dynamic=True)
    compiled = lookahead_generate(model, ids, LAQ, STEPS, mask).tolist()
    assert engine.generate(prompts, STEPS, stop_on_eos=False).tokens == compiled
    # Row 0's third token as EOS: the row stops there and, where the rollout (which starts from the
    # same first token) emits it, the row's later pseudo queries do not vote, as in the compiled path.
    eos = compiled[0][2]
    engine.manifest.eos_token_ids = [eos]
    compiled = lookahead_generate(model, ids, LAQ, STEPS, mask, eos_token_id=eos).tolist()
    assert engine.generate(prompts, STEPS).tokens == [row[: row.index(eos) + 1] if eos in row else row
                                                      for row in compiled]


# MorphKV on a 12-token prompt: the cache grows to 20 entries, then each step evicts one (as ONNX
# graphs in ONNX Runtime). Periodic SnapKV, H2O, Expected Attention and Compactor on a 40-token prompt: prefill
# keeps 16, every fourth step evicts back to 16.
@pytest.mark.parametrize("options, length, target, evict_op", [
    (MORPHKV, 12, "onnx", "KvcCompressDecode"), (PERIODIC_SNAPKV, 40, "exported", "compress_decode"),
    (PERIODIC_H2O, 40, "exported", "compress_decode"), (PERIODIC_EA, 40, "onnx", "KvcCompressDecodeRotary"),
    (PERIODIC_COMPACTOR, 40, "exported", "compress_decode_rotary"),
], ids=["morphkv", "periodic", "periodic-h2o", "periodic-expected-attention", "periodic-compactor"])
def test_compression_while_decoding_engines_keep_the_compiled_tokens(options, length, target, evict_op, tmp_path):
    result = quiet_build(tiny_model("llama", attn_implementation="kvc"), options, tmp_path / "engine",
                         target=target, max_new_tokens=64)
    manifest = result.manifest
    config = CompressionConfig.from_options(options)
    assert manifest.capacity == [config.decode_threshold] * 2 and manifest.decode_target == config.decode_target
    engine_tokens, compiled_tokens = engine_and_compiled_tokens(tmp_path / "engine", options, length, 24)
    assert engine_tokens == compiled_tokens
    # One program appends and one evicts, over the same fixed shapes: eviction is only in the second.
    appending, evicting = (tmp_path / "engine" / entry.file for entry in (manifest.decode, manifest.decode_evict))
    if target == "onnx":  # the buffer shifts are standard nodes; the eviction is a plugin node per layer
        assert not plugin_nodes(onnx.load(str(appending)))
        assert [node.op_type for node in plugin_nodes(onnx.load(str(evicting)))] == [evict_op] * 2
        return
    kvc_ops = {}
    for path in (appending, evicting):
        graph = torch.export.load(str(path)).graph
        kvc_ops[path] = {str(node.target) for node in graph.nodes if str(node.target).startswith("kvc.")}
    assert f"kvc.{evict_op}.default" not in kvc_ops[appending]
    assert {f"kvc.{evict_op}.default", "kvc.shift_in.default"} <= kvc_ops[evicting]


def test_aoti_engine_equals_compiled_reference_and_onnx_and_writes_its_buffers_in_place(tmp_path):
    options = method_options("snapkv")
    result = quiet_build(tiny_model("qwen3", attn_implementation="kvc"), options, tmp_path / "engine")
    files = [entry.file for entry in [*result.manifest.prefill, result.manifest.decode]]
    assert all(file.endswith(".pt2") and not file.endswith(".ep.pt2") for file in files)
    # The packages share one copy of the weights: every parameter is stored once, for every program.
    weights = result.manifest.weights
    assert set(weights["programs"]) == set(files)
    parameters = dict(tiny_model("qwen3").named_parameters())
    with safe_open(tmp_path / "engine" / weights["file"], "pt") as stored:
        assert {f"model.{name}" for name in parameters} <= set(stored.keys())
    parameter_bytes = sum(p.nbytes for p in parameters.values())
    assert (tmp_path / "engine" / weights["file"]).stat().st_size < 1.2 * parameter_bytes
    engine = Engine.load(tmp_path / "engine", trusted=True)
    ids, mask, prompts = padded_batch()
    tokens = engine.generate(prompts, STEPS).tokens
    model = tiny_model("qwen3", attn_implementation="kvc")
    compiled, *_ = compiled_greedy_steps(model, {**options, "inner_backend": "eager"}, ids, mask, STEPS)
    assert tokens == compiled.tolist()
    assert tokens == reference_generate(tiny_model("qwen3"), ids, options, STEPS, mask).tolist()
    # The same model as an ONNX engine, run by ONNX Runtime, keeps the AOTInductor engine's tokens.
    onnx_engine = quiet_build(tiny_model("qwen3", attn_implementation="kvc"), options, tmp_path / "onnx",
                              target="onnx").manifest
    assert Engine.load(tmp_path / "onnx", trusted=True).generate(prompts, STEPS).tokens == tokens
    # Its graphs keep their weights in one shared external-data file, each weight stored once.
    shared = tmp_path / "onnx" / onnx_engine.weights["file"]
    assert shared.stat().st_size < 1.2 * parameter_bytes
    for entry in onnx_engine.programs:
        graph = onnx.load(str(tmp_path / "onnx" / entry.file), load_external_data=False)
        external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert "model.model.embed_tokens.weight" in external
        assert all(len(t.raw_data) < 1024 for t in graph.graph.initializer if t.name not in external)
    # The decode program writes the new entries into the buffers it is given (nothing is returned),
    # right after the prompt's kept entries, and attends over that live prefix only.
    outputs = engine._prefill_program(ids.shape[1])(ids, mask)
    steps = _SlotSteps(engine, unflatten(SlotState, prefill_names(engine.manifest.state_names), outputs[1:]), mask)
    buffers, slot = steps.buffers, outputs[1].shape[2]
    assert steps.first_slot == slot and not buffers[0][:, :, slot].any()
    grown, token = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1), ids[:, -1:].contiguous()
    logits = steps(token, grown)
    assert buffers[0][:, :, slot].abs().sum() > 0 and not buffers[0][:, :, slot + 1].any()
    # What lies past the live prefix is never read: filling it with garbage changes nothing.
    for buffer in buffers[:2]:
        buffer[:, :, slot + 1:] = float("nan")
    buffers[0][:, :, slot].zero_()  # the same step again writes the same entries
    steps.slot_mask[:, slot] = False
    assert torch.equal(steps(token, grown), logits)
    # A package reads its inputs as contiguous without checking: a strided view is refused by name.
    with pytest.raises(EngineError, match="input_ids is a strided view"):
        engine._decode(ids[:, -1:], *[torch.zeros(1)] * 3, *buffers)


def test_sampling_is_seeded_and_eos_stops_a_row(built_engine):
    engine = Engine.load(built_engine, trusted=True)
    _, _, prompts = padded_batch()
    first = engine.generate(prompts, STEPS, temperature=1.0, top_k=20, top_p=0.9, seed=3).tokens
    assert first == engine.generate(prompts, STEPS, temperature=1.0, top_k=20, top_p=0.9, seed=3).tokens
    assert first != engine.generate(prompts, STEPS, temperature=1.0, seed=4).tokens
    greedy = engine.generate(prompts, STEPS).tokens
    engine.manifest.eos_token_ids = [greedy[0][2]]  # row 0 emits it third
    stopped = engine.generate(prompts, STEPS).tokens
    assert stopped[0] == greedy[0][: greedy[0].index(greedy[0][2]) + 1]
    streamed = []
    engine.generate(prompts, 3, on_token=lambda step, token: streamed.append((step, token.tolist())))
    assert [step for step, _ in streamed] == [0, 1, 2]


def test_prompt_ranges_split_where_the_kept_length_changes_form():
    snapkv = CompressionConfig.from_options({"method": "snapkv", "compression_ratio": 0.5, "window_size": 8})
    assert _prefill_ranges(snapkv, 96) == [(1, 8), (9, 96)]
    knorm = CompressionConfig.from_options({"method": "knorm", "compression_ratio": 0.75})
    assert _prefill_ranges(knorm, 96) == [(1, 7), (8, 96)]  # floor(n/4) >= 2 from n = 8
    with pytest.raises(EngineError, match="observation window"):
        _prefill_ranges(snapkv, 8)


def test_tuned_aoti_engine_carries_its_decode_weights_and_keeps_the_compiled_tokens(tmp_path):
    options = method_options("snapkv")
    result = quiet_build(tiny_model("llama", attn_implementation="kvc"), {**options, "tune_decode": True},
                         tmp_path / "engine")
    manifest = result.manifest
    assert manifest.tuned_decode and manifest.self_contained == [manifest.decode.file]
    # The decode program carries its packed weights; the prefill programs still share the weights file.
    assert set(manifest.weights["programs"]) == {entry.file for entry in manifest.prefill}
    # Three rows, one left-padded: not the batch size the GEMMs were autotuned at.
    ids, mask, prompts = padded_batch()
    ids, mask = torch.cat([ids, random_prompt(1, 40, seed=3)]), torch.cat([mask, torch.ones(1, 40, dtype=mask.dtype)])
    prompts.append(ids[2].tolist())
    tokens = Engine.load(tmp_path / "engine", trusted=True).generate(prompts, STEPS).tokens
    compiled, *_ = compiled_greedy_steps(tiny_model("llama", attn_implementation="kvc"),
                                         {**options, "inner_backend": "eager"}, ids, mask, STEPS)
    assert tokens == compiled.tolist()


@pytest.mark.parametrize("options, target, message", [
    ({**PERIODIC_SNAPKV, "tune_decode": True}, "exported", "tune_decode.*--target aoti"),
    ({**PERIODIC_SNAPKV, "budget": 40}, "exported", "keeps up to 40 entries.*at most 19"),
    ({"method": "adakv", "scorer_options": {"window_size": 4}, "budget": 16, "decoding_interval": 4,
      "target_size": 16}, "exported", "per-head budgets.*only dense caches.*torch.compile"),
])
def test_unsupported_methods_are_refused(options, target, message, tmp_path):
    with pytest.raises(EngineError, match=message):
        quiet_build(tiny_model("llama"), options, tmp_path / "engine", target=target)


@pytest.mark.parametrize("target, message", [("tensorrt", "tensorrt"), ("tflite", "unknown target")])
def test_targets_that_cannot_build_here_say_so(target, message, tmp_path):
    with pytest.raises(EngineError, match=message):
        quiet_build(tiny_model("llama"), method_options("knorm"), tmp_path / "engine", target=target)


@pytest.fixture(scope="module")
def built_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "engine"
    quiet_build(tiny_model("llama", attn_implementation="kvc"), method_options("knorm"), out, target="exported")
    return out


def copy_engine(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_cli_errors_not_tracebacks(built_engine, tmp_path, capsys):
    cases = [
        (build_cli, ["--model", "gpt-17", "--weights", "random", "--method", "knorm", "--out", str(tmp_path / "a")],
         "unknown preset"),
        (build_cli, ["--model", "smollm2-135m", "--weights", "random", "--layers", "1", "--method", "knorm",
                     "--out", str(built_engine)], "not empty"),
        (build_cli, ["--model", "smollm2-135m", "--weights", "random", "--layers", "1", "--method", "knorm",
                     "--out", str(built_engine / MANIFEST / "sub")], "--out"),
        (build_cli, ["--model", "smollm2-135m", "--method", "snapkv", "--option", "window_size=-3", "--out",
                     str(tmp_path / "b")], "window_size"),
        (run_cli, [str(tmp_path / "missing"), "--token-ids", "5 6 7"], "does not exist"),
        (run_cli, [str(built_engine), "--trust-engine", "--token-ids", " ".join(["5"] * 97)], "max context of 96"),
        (run_cli, [str(built_engine), "--trust-engine", "--prompt", "hello"], "no tokenizer"),
        (run_cli, [str(built_engine), "--trust-engine", "--token-ids", "5 6", "--max-new-tokens", "13"],
         "--max-new-tokens 13"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err.replace("\n", ""), argv


def test_damaged_engines_are_reported(built_engine, tmp_path):
    corrupted = copy_engine(built_engine, tmp_path / "corrupted")
    program = next(corrupted.glob("decode*"))
    program.write_bytes(program.read_bytes()[:-1] + b"x")
    with pytest.raises(EngineError, match="corrupted: decode"):
        Engine.load(corrupted, trusted=True)
    incomplete = copy_engine(built_engine, tmp_path / "incomplete")
    next(incomplete.glob("prefill*")).unlink()
    with pytest.raises(EngineError, match="incomplete: prefill"):
        Engine.load(incomplete, trusted=True)
    no_manifest = copy_engine(built_engine, tmp_path / "no-manifest")
    (no_manifest / MANIFEST).unlink()
    with pytest.raises(EngineError, match="no manifest.json"):
        Engine.load(no_manifest, trusted=True)
    future = copy_engine(built_engine, tmp_path / "future")
    manifest = json.loads((future / MANIFEST).read_text())
    manifest["format_version"] = 99
    (future / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="format version 99"):
        Engine.load(future, trusted=True)
    tuned = copy_engine(built_engine, tmp_path / "tuned")  # only AOTInductor programs are tuned
    manifest = json.loads((tuned / MANIFEST).read_text())
    manifest["tuned_decode"] = True
    (tuned / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="'tuned_decode' must be .*'aoti'"):
        Engine.load(tuned, trusted=True)
    garbled = copy_engine(built_engine, tmp_path / "garbled")
    (garbled / MANIFEST).write_text("{")
    with pytest.raises(EngineError, match="corrupted"):
        Engine.load(garbled, trusted=True)


def test_manifest_records_what_the_engine_is(built_engine):
    manifest = json.loads((built_engine / MANIFEST).read_text())
    assert manifest["compression"]["method"] == "knorm" and manifest["compression"]["compression_ratio"] == 0.5
    assert manifest["model"]["layers"] == 2 and manifest["model"]["kv_heads"] == 2
    assert manifest["budgets"]["at_max_context"] == [48, 48]  # half of 96
    assert manifest["capacity"] == [48 + 12, 48 + 12]
    assert set(manifest["versions"]) >= {"torch", "transformers", "kvc_compile"}
    assert sorted(manifest["files"]) == sorted(p.name for p in built_engine.iterdir() if p.name != MANIFEST)
    assert all(len(digest) == 64 for digest in manifest["files"].values())


@pytest.mark.parametrize("preset, dims", [
    ("smollm2-135m", (30, 9, 3, 64)), ("mistral-7b", (32, 32, 8, 128)), ("llama-3.1-8b", (32, 32, 8, 128)),
    ("qwen2.5-7b", (28, 28, 4, 128)), ("qwen3-8b", (36, 32, 8, 128)),
])
def test_presets_ship_their_architecture(preset, dims):
    config = preset_config(preset)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, head_dim) == dims
    assert preset_config(preset, layers=2).num_hidden_layers == 2


def test_random_weight_presets_build_from_the_cli(tmp_path, capsys):
    out = tmp_path / "engine"
    assert build_cli(["--model", "smollm2-135m", "--weights", "random", "--layers", "1", "--method", "knorm",
                      "--target", "exported", "--max-context", "64", "--max-new-tokens", "4", "--max-batch", "2",
                      "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "bytes saved per prompt token" in err and "32 entries per KV head" in err
    # The printed run command works for this engine: no tokenizer (random weights), exported (trust).
    assert f"kvc-run {out} --trust-engine --token-ids '1 2 3'" in " ".join(err.split())
    assert run_cli([str(out), "--trust-engine", "--token-ids", "5 6 7 8", "--token-ids", "9 10",
                    "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "#0" in printed and "#1" in printed


def test_build_options_take_numbers_json_and_strings():
    from kvc_compile.cli.build import parse_option
    from kvc_compile.cli.common import UsageError

    assert parse_option("window_size=32") == ("window_size", 32)
    assert parse_option("pooling=max") == ("pooling", "max")
    assert parse_option('kqsvd={"projections": "p.safetensors", "key_rank": 16}') == (
        "kqsvd", {"projections": "p.safetensors", "key_rank": 16})
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_option("kqsvd={projections: p}")
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_option("window_size")
