"""KQ-SVD inside the compiled graph: rank-R cache entries after any eviction, the same tokens as the
eager reference, the bytes the ranks promise, and the errors a user can run into."""

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile import CompressedCache, CompressionConfig, cache_nbytes, reference_generate, reference_prefill
from kvc_compile.compression.lowrank import CalibrationMismatchError
from kvc_compile.eval.lowrank import calibrate_lowrank
from kvc_compile.transformers_compat import CACHE_ARG, output_cache, with_cache

PROMPT, NEW = 40, 8


@pytest.fixture(scope="module")
def projections_file(tmp_path_factory):
    """Projections of the tiny Llama (seed 0), calibrated on a random prompt: what kvc-calibrate writes."""
    path = tmp_path_factory.mktemp("kqsvd") / "tiny-llama.safetensors"
    calibrate_lowrank(tiny_model("llama"), [random_prompt(1, 96, seed=9)], rank=16).save(path)
    return str(path)


def padded_batch():
    ids = random_prompt(2, PROMPT, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def compiled_generate(model, options, ids, mask):
    model.compile(backend="kvc", options=options, dynamic=True)
    try:
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **with_cache(CompressedCache()),
                return_dict_in_generate=True,
            )
    finally:
        model._compiled_call_impl = None


LOWRANK = {"key_rank": 6, "value_rank": 4}
CASES = {
    "kqsvd alone": {"method": "kqsvd", **LOWRANK},
    "snapkv + kqsvd": {"method": "snapkv", "window_size": 8, "compression_ratio": 0.5, "kqsvd": LOWRANK},
    "adakv + kqsvd (packed)": {
        "method": "adakv", "scorer_options": {"window_size": 8}, "compression_ratio": 0.5, "kqsvd": LOWRANK,
    },
    "lava + kqsvd (layer budgets)": {"method": "lava", "window_size": 8, "compression_ratio": 0.5, "kqsvd": LOWRANK},
}


def with_file(options: dict, path: str) -> dict:
    options = dict(options)
    if options["method"] == "kqsvd":
        return {**options, "projections": path}
    return {**options, "kqsvd": {**options["kqsvd"], "projections": path}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_lowrank_cache_keeps_the_references_entries_and_tokens(case, projections_file):
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    options = {**with_file(CASES[case], projections_file), "inner_backend": "eager"}
    reference = reference_prefill(model, ids, options, attention_mask=mask)
    expected = reference_generate(model, ids, options, max_new_tokens=NEW, attention_mask=mask)
    out = compiled_generate(model, options, ids, mask)
    assert torch.equal(out.sequences[:, PROMPT:], expected)
    for layer, kept, positions in zip(output_cache(out).layers, reference.cache.layers, reference.kept_indices,
                                      strict=True):
        assert layer.lowrank and layer.keys.shape[-1] == 6 and layer.values.shape[-1] == 4
        prompt_entries = kept.keys.shape[-2]
        assert torch.equal(layer.positions[..., :prompt_entries], positions)
        torch.testing.assert_close(layer.keys[..., :prompt_entries, :], kept.keys, rtol=1e-4, atol=1e-5)


def test_inductor_lowrank_with_eviction_matches_the_reference(projections_file):
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    options = with_file(CASES["snapkv + kqsvd"], projections_file)
    expected = reference_generate(model, ids, options, max_new_tokens=NEW, attention_mask=mask)
    assert torch.equal(compiled_generate(model, options, ids, mask).sequences[:, PROMPT:], expected)


def test_full_rank_projections_change_nothing(projections_file):
    # At rank head_dim, A B^T = I: the projected cache gives the full cache's tokens.
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    full_rank = {"method": "kqsvd", "projections": projections_file, "inner_backend": "eager"}
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(compiled_generate(model, full_rank, ids, mask).sequences, plain)


def test_cache_bytes_shrink_by_the_rank_ratio(projections_file):
    model = tiny_model("llama", attn_implementation="kvc")
    ids = random_prompt(1, PROMPT, seed=2)
    full, low = CompressedCache(), CompressedCache()
    compiled = torch.compile(model, backend="kvc", dynamic=True, options={
        "method": "kqsvd", "projections": projections_file, "key_rank": 4, "value_rank": 8, "inner_backend": "eager",
    })
    with torch.no_grad():
        model(ids, use_cache=True, **with_cache(full))
        compiled(ids, use_cache=True, **with_cache(low))
    for dense, thin in zip(full.layers, low.layers, strict=True):
        assert thin.keys.untyped_storage().nbytes() * 4 == dense.keys.untyped_storage().nbytes()  # 4 of 16
        assert thin.values.untyped_storage().nbytes() * 2 == dense.values.untyped_storage().nbytes()  # 8 of 16
    assert cache_nbytes(low) < cache_nbytes(full)


def test_kqsvd_without_a_calibration_file_explains_how_to_make_one(tmp_path):
    with pytest.raises(ValueError, match="kvc-calibrate --model MODEL --out"):
        CompressionConfig.from_options({"method": "kqsvd"})
    with pytest.raises(ValueError, match="kvc-calibrate"):
        CompressionConfig.from_options({"method": "kqsvd", "projections": str(tmp_path / "none.safetensors")})
    with pytest.raises(ValueError, match="kvc-calibrate"):
        CompressionConfig.from_options({"method": "snapkv", "compression_ratio": 0.5, "kqsvd": {"key_rank": 8}})


def test_kqsvd_options_are_checked(projections_file):
    with pytest.raises(ValueError, match="keeps every token"):
        CompressionConfig.from_options({"method": "kqsvd", "projections": projections_file, "compression_ratio": 0.5})
    with pytest.raises(ValueError, match="valid options: projections, key_rank, value_rank"):
        CompressionConfig.from_options({"method": "snapkv", "compression_ratio": 0.5,
                                        "kqsvd": {"projections": projections_file, "rank": 8}})
    with pytest.raises(ValueError, match="key_rank must be a positive integer"):
        CompressionConfig.from_options({"method": "kqsvd", "projections": projections_file, "key_rank": 0})
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, head_dim=16\]"):
        CompressionConfig.from_options({"method": "kqsvd", "projections": projections_file, "key_rank": 32})
    with pytest.raises(ValueError, match="next to kqsvd.*drop decoding_interval and target_size"):
        CompressionConfig.from_options({"method": "snapkv", "budget": 16, "window_size": 4, "decoding_interval": 4,
                                        "target_size": 16, "kqsvd": {"projections": projections_file}})


def test_projections_of_another_model_are_refused(projections_file):
    options = {"method": "kqsvd", "projections": projections_file, "inner_backend": "eager"}
    ids = random_prompt(1, PROMPT)
    with pytest.raises(CalibrationMismatchError, match="weights_sha256"):
        reference_prefill(tiny_model("llama", seed=1), ids, options)
    deeper = tiny_model("llama", attn_implementation="kvc", num_hidden_layers=3)
    compiled = torch.compile(deeper, backend="kvc", options=options)
    with torch.no_grad(), pytest.raises(Exception, match="num_hidden_layers: file 2 vs model 3"):
        compiled(ids, use_cache=True, **with_cache(CompressedCache()))


def test_lowrank_needs_compressed_cache_and_kvc_attention(projections_file):
    options = {"method": "kqsvd", "projections": projections_file, "inner_backend": "eager"}
    ids = random_prompt(1, PROMPT)
    compiled = torch.compile(tiny_model("llama", attn_implementation="kvc"), backend="kvc", options=options)
    with torch.no_grad(), pytest.raises(Exception, match=f"{CACHE_ARG}=kvc_compile.CompressedCache"):
        compiled(ids, use_cache=True)
    model = tiny_model("llama", attn_implementation="sdpa")
    prefill = reference_prefill(model, ids, options)
    with torch.no_grad(), pytest.raises(TypeError, match="attn_implementation='kvc'"):
        model(ids[:, -1:], **with_cache(prefill.cache), use_cache=True)


def test_decode_graphs_fold_the_value_lift_into_o_proj(projections_file, monkeypatch):
    from kvc_compile.passes import FoldValueProjection

    folded, original = [], FoldValueProjection.__call__

    def spy(self, gm, sites):
        count = original(self, gm, sites)
        lifts = [n for n in gm.graph.nodes if n.target == torch.ops.kvc.lowrank_lift.default]
        folded.append((count, len(lifts)))
        return count

    monkeypatch.setattr(FoldValueProjection, "__call__", spy)
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    options = {"method": "kqsvd", "projections": projections_file, "key_rank": 6, "value_rank": 4,
               "inner_backend": "eager"}
    expected = reference_generate(model, ids, options, max_new_tokens=NEW, attention_mask=mask)  # lifts, unfolded
    assert torch.equal(compiled_generate(model, options, ids, mask).sequences[:, PROMPT:], expected)
    # Prefill graphs have nothing to fold; decode graphs fold both layers and keep no lift.
    assert (2, 0) in folded and all(lifts == 0 for _, lifts in folded)


def test_decode_graphs_fuse_rope_into_the_key_projection(projections_file, monkeypatch):
    from kvc_compile.passes import FuseRopeIntoLowRankProjection

    fused, original = [], FuseRopeIntoLowRankProjection.__call__

    def spy(self, gm, sites):
        count = original(self, gm, sites)
        targets = [n.target for n in gm.graph.nodes]
        fused.append((count, targets.count(torch.ops.kvc.lowrank_project.default)))
        return count

    monkeypatch.setattr(FuseRopeIntoLowRankProjection, "__call__", spy)
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    options = {**with_file(CASES["kqsvd alone"], projections_file), "inner_backend": "eager"}
    expected = reference_generate(model, ids, options, max_new_tokens=NEW, attention_mask=mask)  # unfused RoPE
    assert torch.equal(compiled_generate(model, options, ids, mask).sequences[:, PROMPT:], expected)
    # Decode graphs: both layers' new keys are rotated and projected by one op; values keep theirs.
    assert (2, 2) in fused
