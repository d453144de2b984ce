"""Every registered method, compiled by the kvc backend, keeps the reference's entries and decodes
the reference's tokens (tiny random Llama and Qwen3, a left-padded batch, eager inner backend)."""

import pytest
import torch
from conftest import calibrated_filters, random_prompt, tiny_model

from kvc_compile import CompressedCache, lookahead_generate, reference_prefill
from kvc_compile.methods import list_token_methods
from kvc_compile.reference import reference_decode
from kvc_compile.transformers_compat import output_cache, with_cache

PROMPT, NEW = 40, 8
# Options that make every method compress a 40-token prompt (windows shorter than the prompt).
METHOD_OPTIONS = {
    "snapkv": {"window_size": 8},
    "streamingllm": {},
    "knorm": {},
    "keydiff": {},
    "lagkv": {"n_sink": 2, "lag_size": 8},
    "random": {"seed": 3},
    "h2o": {},
    "tova": {},
    "expected_attention": {"n_sink": 2},
    "obcache": {"window_size": 8},
    "curdkv": {"local_window_size": 8},
    "adacurdkv": {"local_window_size": 8},
    "compactor": {"chunk_size": 16, "sketch_size": 8},
    "lava": {"window_size": 8},
    "pyramidkv": {"window_size": 8},
    "adakv": {"scorer_options": {"window_size": 8}},
    "chunkkv": {"scorer_options": {"window_size": 8}, "chunk_length": 5},
    "criticalkv": {"scorer_options": {"window_size": 8}},
    "criticaladakv": {"scorer_options": {"window_size": 8}},
    "morphkv": {"window_size": 4, "budget": 20},  # a constant-size cache: an absolute budget
    "laq": {"lookahead": 4, "window_size": 2, "stage1_options": {"window_size": 8}},
    "qfilters": {},  # filters calibrated on the test's own tiny model (calibrated_filters)
}


def test_every_registered_method_is_covered():
    assert sorted(METHOD_OPTIONS) == list_token_methods()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_compiled_method_keeps_reference_entries_and_tokens(method, arch, tmp_path_factory):
    model = tiny_model(arch, attn_implementation="kvc")
    ids = random_prompt(2, PROMPT, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[mask == 0] = 0
    opts = {"method": method, "inner_backend": "eager", **METHOD_OPTIONS[method]}
    if "budget" not in opts:
        opts["compression_ratio"] = 0.5
    if method == "qfilters":
        opts["filters"] = calibrated_filters(arch, tmp_path_factory.getbasetemp())
    reference = reference_prefill(model, ids, opts, attention_mask=mask)
    decoded_reference = reference_decode(model, ids, opts, max_new_tokens=NEW, attention_mask=mask)
    model.compile(backend="kvc", options=opts, dynamic=True)
    if method == "laq":  # the rollout needs its own loop; its cache is checked in tests/test_methods_laq.py
        tokens = lookahead_generate(model, ids, opts, NEW, attention_mask=mask)
        assert torch.equal(tokens, decoded_reference.tokens)
        return
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **with_cache(CompressedCache()),
            return_dict_in_generate=True,
        )
    layers = output_cache(out).layers
    assert torch.equal(out.sequences[:, PROMPT:], decoded_reference.tokens)
    for layer, reference_layer in zip(layers, decoded_reference.cache.layers, strict=True):
        assert torch.equal(layer.positions, reference_layer.positions)
        assert torch.equal(layer.heads, reference_layer.heads)
    if method == "morphkv":
        return  # decoding evicted prompt entries too (tests/test_methods_morphkv.py)
    decoded = torch.arange(PROMPT, PROMPT + NEW - 1, dtype=torch.int32)  # the last token is not cached yet
    for layer, positions, heads in zip(layers, reference.kept_indices, reference.kept_heads, strict=True):
        prompt_entries = positions.shape[-1]
        assert torch.equal(layer.positions[..., :prompt_entries], positions)
        assert torch.equal(layer.heads[..., : heads.shape[-1]], heads)
        # Decoded entries record their logical positions (one per KV head per token when packed).
        per_token = 1 if layer.keys.shape[1] == 2 else 2
        assert torch.equal(layer.positions[0, 0, prompt_entries:], decoded.repeat_interleave(per_token))
