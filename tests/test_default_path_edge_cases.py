"""The default path (Inductor inner backend) on ordinary input that keeps every entry, and under
grad mode: prompts no longer than the observation window, ratio 0, a budget above the prompt, a
one-token prompt. Each compiled cache equals the uncompressed cache of the eager model."""

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile.backend.grad_mode import InferenceOnlyWarning
from kvc_compile.transformers_compat import output_cache

WINDOW = 8


def eager_cache(model, ids):
    with torch.no_grad():
        return output_cache(model(ids, use_cache=True))


def assert_keeps_everything(model, compiled, ids):
    with torch.no_grad():
        out = compiled(ids, use_cache=True)
    full = eager_cache(model, ids)
    for layer, full_layer in zip(output_cache(out).layers, full.layers, strict=True):
        torch.testing.assert_close(layer.keys, full_layer.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.values, full_layer.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [{"compression_ratio": 0.5}, {"compression_ratio": 0.0}, {"budget": 64}],
                         ids=["prompt within the window", "ratio 0", "budget above the prompt"])
def test_inductor_keeps_whole_prompts(budget):
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="kvc", options={"method": "snapkv", "window_size": WINDOW, **budget},
                             dynamic=True)
    lengths = (WINDOW - 3, WINDOW) if "compression_ratio" in budget and budget["compression_ratio"] else (24,)
    for length in lengths:
        assert_keeps_everything(model, compiled, random_prompt(2, length, seed=length))


def test_inductor_one_token_prompt_and_generate():
    model = tiny_model("llama")
    model.compile(backend="kvc", options={"method": "snapkv", "window_size": WINDOW, "compression_ratio": 0.5},
                  dynamic=True)
    try:
        ids = random_prompt(1, 1)
        assert_keeps_everything(model, model, ids)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
        model._compiled_call_impl = None
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, expected)
    finally:
        model._compiled_call_impl = None


def test_grad_mode_runs_without_gradients_and_says_so():
    """The README's first snippet, outside torch.no_grad(): it compresses, and warns that the outputs
    carry no gradient (the selection has none)."""
    model = tiny_model("llama")
    ids = random_prompt(1, 40)
    compiled = torch.compile(model, backend="kvc", options={"method": "snapkv", "window_size": WINDOW,
                                                            "compression_ratio": 0.5}, dynamic=True)
    assert torch.is_grad_enabled()
    with pytest.warns(InferenceOnlyWarning, match="no_grad"):
        out = compiled(ids, use_cache=True)
    assert output_cache(out).layers[0].keys.shape[2] == 20
    assert not out.logits.requires_grad
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, mask, message", [
    ((1, 0), None, "the prompt is empty"),
    ((0, 10), None, "the batch holds no prompt"),
    ((2, 6), torch.tensor([[1] * 6, [0] * 6]), r"prompt rows \[1\] are all padding"),
])
def test_empty_prompts_are_refused_with_the_reason(shape, mask, message):
    from kvc_compile import reference_generate, reference_prefill

    model = tiny_model("llama")
    ids = random_prompt(*shape)
    options = {"method": "snapkv", "window_size": WINDOW, "compression_ratio": 0.5}
    with pytest.raises(ValueError, match=message):
        reference_prefill(model, ids, options, attention_mask=mask)
    with pytest.raises(ValueError, match=message):
        reference_generate(model, ids, options, max_new_tokens=2, attention_mask=mask)
