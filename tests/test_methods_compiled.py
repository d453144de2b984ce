"""Every registered method, compiled by the kvc backend, keeps the reference's entries and decodes
the reference's tokens (tiny random Llama and Qwen3, a left-padded batch, eager inner backend)."""

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile import CompressedCache, list_methods, reference_generate, reference_prefill

PROMPT, NEW = 40, 8
# Options that make every method compress a 40-token prompt (windows shorter than the prompt).
METHOD_OPTIONS = {
    "snapkv": {"window_size": 8},
    "streamingllm": {},
    "knorm": {},
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
}


def test_every_registered_method_is_covered():
    assert sorted(METHOD_OPTIONS) == list_methods()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_compiled_method_keeps_reference_entries_and_tokens(method, arch):
    model = tiny_model(arch, attn_implementation="kvc")
    ids = random_prompt(2, PROMPT, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[mask == 0] = 0
    opts = {"method": method, "compression_ratio": 0.5, "inner_backend": "eager", **METHOD_OPTIONS[method]}
    reference = reference_prefill(model, ids, opts, attention_mask=mask)
    expected = reference_generate(model, ids, opts, max_new_tokens=NEW, attention_mask=mask)
    model.compile(backend="kvc", options=opts, dynamic=True)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, past_key_values=CompressedCache(),
            return_dict_in_generate=True,
        )
    layers = out.past_key_values.layers
    for layer, positions, heads in zip(layers, reference.kept_indices, reference.kept_heads, strict=True):
        assert torch.equal(layer.positions, positions)
        assert torch.equal(layer.heads[..., : heads.shape[-1]], heads)
    assert torch.equal(out.sequences[:, PROMPT:], expected)
