"""End to end on the real SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads), offline."""

import pytest
import torch

from kvc_compile import CompressionConfig, reference_generate, reference_prefill
from kvc_compile.compression.layout import gather_kept
from kvc_compile.eval.passkey import answer_is_correct, passkey_inputs
from kvc_compile.transformers_compat import output_cache

pytestmark = pytest.mark.smollm2

# SnapKV with the paper's LongBench setting. With kvpress's defaults (window 64, average pooling, kernel 5)
# SmolLM2 loses digits of the key at this ratio; test_smollm2_methods.py runs those defaults.
PAPER_SNAPKV = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 32, "kernel_size": 7, "pooling": "max"}
PASSKEY_SAMPLES = 10
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def compiled_smollm2(smollm2):
    """SmolLM2 compiled in place by Inductor through the kvc backend, once for this module."""
    model, tokenizer = smollm2
    model.compile(backend="kvc", options=PAPER_SNAPKV, dynamic=True)
    yield model, tokenizer
    model._compiled_call_impl = None  # back to eager for other modules
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield  # keep the module's compiled program between its tests


def test_compiled_generate_keeps_reference_tokens(compiled_smollm2):
    model, tokenizer = compiled_smollm2
    _, ids = passkey_inputs(tokenizer, target_tokens=1300, seed=0)
    n = ids.shape[1]
    n_kept = CompressionConfig.from_options(PAPER_SNAPKV).kept_length(n)
    reference = reference_prefill(model, ids, PAPER_SNAPKV)
    with torch.no_grad():
        full = output_cache(model.forward(ids, use_cache=True))  # eager, uncompressed
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    layers = output_cache(out).layers
    assert len(layers) == 30
    for layer_idx, layer in enumerate(layers):
        assert layer.keys.shape == (1, 3, n_kept + NEW_TOKENS - 1, 64)
        expected = gather_kept(full.layers[layer_idx].keys, reference.kept_indices[layer_idx])
        torch.testing.assert_close(layer.keys[:, :, :n_kept], expected, rtol=1e-4, atol=1e-4)
    expected_tokens = reference_generate(model, ids, PAPER_SNAPKV, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences[:, n:], expected_tokens)


def test_passkey_accuracy_compressed_matches_full_cache(compiled_smollm2, record_property):
    model, tokenizer = compiled_smollm2
    full_correct = compressed_correct = 0
    for seed in range(PASSKEY_SAMPLES):
        sample, ids = passkey_inputs(tokenizer, target_tokens=1300, seed=seed)
        with torch.no_grad():
            compressed = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        full = reference_generate(model, ids, {"method": "snapkv", "compression_ratio": 0.0}, NEW_TOKENS)
        compressed_correct += answer_is_correct(tokenizer.decode(compressed[0, ids.shape[1]:]), sample)
        full_correct += answer_is_correct(tokenizer.decode(full[0]), sample)
    record_property("passkey_full", full_correct)
    record_property("passkey_snapkv_0.5", compressed_correct)
    print(f"pass key, {PASSKEY_SAMPLES} samples, ~1.3K tokens: full {full_correct}, snapkv@0.5 {compressed_correct}")
    assert full_correct >= PASSKEY_SAMPLES // 2  # the task is above chance for this model
    assert compressed_correct >= full_correct
