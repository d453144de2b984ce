"""Every method on SmolLM2-135M through the kvc pass (eager inner backend: the point is the pass),
against the eager reference: kept tokens, cache size during generate(), greedy tokens."""

import pytest
import torch

from kvc_compile import reference_generate, reference_prefill
from kvc_compile.eval.passkey import passkey_inputs
from kvc_compile.methods.base import gather_kept

pytestmark = pytest.mark.smollm2
NEW_TOKENS = 6


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "knorm", "random"])
def test_method_generate_equals_reference(smollm2, method):
    model, tokenizer = smollm2
    options = {"method": method, "compression_ratio": 0.5, "inner_backend": "eager"}
    _, ids = passkey_inputs(tokenizer, target_tokens=1300, seed=1)
    n, n_kept = ids.shape[1], ids.shape[1] // 2
    reference = reference_prefill(model, ids, options)
    expected = reference_generate(model, ids, options, max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        full = model.forward(ids, use_cache=True).past_key_values
    model.compile(backend="kvc", options=options)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    finally:
        model._compiled_call_impl = None  # leave the shared model eager
    assert torch.equal(out.sequences[:, n:], expected)
    for layer_idx, layer in enumerate(out.past_key_values.layers):
        assert layer.keys.shape[-2] == n_kept + NEW_TOKENS - 1
        kept = reference.kept_indices[layer_idx]
        torch.testing.assert_close(layer.values[:, :, :n_kept], gather_kept(full.layers[layer_idx].values, kept))
