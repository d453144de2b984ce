"""Q-Filters: the filter maths by hand, calibration on a tiny model, the file with the model's
identity, and compression while decoding (the compiled prefill against the reference:
tests/test_methods_compiled.py)."""

import pytest
import torch
from conftest import calibrated_filters, random_prompt, tiny_model

from kvc_compile import CompressedCache, reference_prefill
from kvc_compile.config import CompressionConfig
from kvc_compile.methods.base import ScoreInputs
from kvc_compile.methods.qfilters import QFilters, QueryFilters, fit_filters
from kvc_compile.models.identity import CalibrationMismatchError
from kvc_compile.reference import capture_prefill, reference_decode
from kvc_compile.transformers_compat import output_cache, with_cache


def test_filter_is_the_signed_principal_query_direction_and_keys_score_by_projection(tmp_path):
    # Queries (3, 0), (1, 0), (0, 1): Q^T Q = [[10, 0], [0, 1]], principal direction ±(1, 0); their sum
    # (4, 1) projects positively on (1, 0). Negating the first coordinate of every query flips the filter.
    queries = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(fit_filters(queries.T @ queries, queries.sum(0)), torch.tensor([1.0, 0.0]))
    flipped = queries * torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(fit_filters(flipped.T @ flipped, flipped.sum(0)), torch.tensor([-1.0, 0.0]))
    # A key's score is its projection on its head's filter: keys (2, 5), (-1, 0), (0.5, 9) score 2, -1, 0.5.
    path = tmp_path / "filters.safetensors"
    QueryFilters(torch.tensor([[[1.0, 0.0]]]), {"name": "toy"}, {}).save(path)
    keys = torch.tensor([[[[2.0, 5.0], [-1.0, 0.0], [0.5, 9.0]]]])
    inputs = ScoreInputs(keys, keys, keys, torch.ones(1, 3, dtype=torch.bool), 0)
    torch.testing.assert_close(QFilters(filters=str(path)).score(inputs), torch.tensor([[[2.0, -1.0, 0.5]]]))


@pytest.fixture(scope="module")
def llama_filters(tmp_path_factory):
    return calibrated_filters("llama", tmp_path_factory.mktemp("qfilters"))


def test_calibration_pools_each_group_and_the_mean_query_projects_positively(llama_filters):
    model = tiny_model("llama")
    filters = QueryFilters.load(llama_filters)
    sites = capture_prefill(model, random_prompt(1, 48, seed=5)).sites
    kv_heads, head_dim = sites[0].keys.shape[1], sites[0].keys.shape[3]
    assert filters.filters.shape == (len(sites), kv_heads, head_dim)
    torch.testing.assert_close(filters.filters.norm(dim=-1), torch.ones(len(sites), kv_heads))
    # Over both calibration prompts, each group's mean query has a positive projection on its filter.
    prompts = [capture_prefill(model, random_prompt(1, 48, seed=s)).sites for s in (5, 6)]
    for layer in range(len(sites)):
        queries = torch.cat([p[layer].query[0] for p in prompts], dim=1)  # [q_heads, 96, d]
        grouped = queries.reshape(kv_heads, -1, head_dim)  # each KV head's group pooled
        assert (torch.einsum("knd,kd->k", grouped, filters.filters[layer]) > 0).all()
    assert filters.identity["num_key_value_heads"] == kv_heads and filters.settings["tokens"] == 96


def test_filters_of_another_model_or_no_file_are_refused(llama_filters, tmp_path):
    options = {"method": "qfilters", "filters": llama_filters, "compression_ratio": 0.5}
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(CalibrationMismatchError, match="calibrated for another model.*kvc-calibrate --method qfilters"):
        reference_prefill(other, random_prompt(1, 20), options)
    with pytest.raises(ValueError, match="qfilters needs filters=FILE.*kvc-calibrate --method qfilters"):
        CompressionConfig.from_options({"method": "qfilters", "compression_ratio": 0.5})
    with pytest.raises(FileNotFoundError, match="no Q-Filters file at .*kvc-calibrate --method qfilters"):
        CompressionConfig.from_options({**options, "filters": str(tmp_path / "missing.safetensors")})


def test_compiled_qfilters_compress_while_decoding_as_the_reference_does(llama_filters):
    options = {"method": "qfilters", "filters": llama_filters, "budget": 16, "decoding_interval": 4, "target_size": 16}
    model = tiny_model("llama", attn_implementation="kvc")
    ids = random_prompt(2, 30, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = 0
    reference = reference_decode(model, ids, options, max_new_tokens=12, attention_mask=mask)
    torch._dynamo.reset()
    model.compile(backend="kvc", options={**options, "inner_backend": "eager"}, dynamic=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             **with_cache(CompressedCache()), return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, 30:], reference.tokens)
    for layer, reference_layer in zip(output_cache(out).layers, reference.cache.layers, strict=True):
        assert layer.keys.shape[2] < 30 + 12  # evicted while decoding, back to the target
        assert torch.equal(layer.positions, reference_layer.positions)
