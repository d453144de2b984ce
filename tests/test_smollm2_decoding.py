"""MorphKV and LAQ on SmolLM2-135M through the kvc pass (eager inner backend), against the eager
reference: a constant cache over 200 generated tokens, one compiled decode graph, equal tokens."""

import pytest
import torch
from conftest import compiled_greedy_steps
from torch._dynamo.utils import counters

from kvc_compile import CompressedCache, CompressionConfig, lookahead_generate
from kvc_compile.lookahead import decode_step, lookahead_stage, prompt_position_ids
from kvc_compile.reference import reference_decode
from kvc_compile.transformers_compat import with_cache

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def story_prompt(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a map."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.fixture
def kvc_attention(smollm2):
    model, _ = smollm2
    original = model.config._attn_implementation
    model.set_attn_implementation("kvc")
    yield model
    model._compiled_call_impl = None
    model.set_attn_implementation(original)


def test_morphkv_keeps_a_constant_cache_over_200_tokens(kvc_attention, story_prompt):
    model = kvc_attention
    options = {"method": "morphkv", "budget": 40, "window_size": 16, "inner_backend": "eager"}
    mask = torch.ones_like(story_prompt)
    reference = reference_decode(model, story_prompt, options, max_new_tokens=201, attention_mask=mask)
    counters.clear()
    tokens, cache, lengths, sizes = compiled_greedy_steps(model, options, story_prompt, mask, 200)
    assert torch.equal(tokens, reference.tokens[:, :200])
    # Never more than budget (the paper's C + 1) entries per KV head, after every step; bytes flat.
    assert all(max(step) <= 40 for step in lengths) and all(step == [40] * 30 for step in lengths)
    assert len(set(sizes)) == 1
    assert counters["stats"]["unique_graphs"] == 2  # the prefill graph and one decode graph for all 200 steps
    for layer, reference_layer in zip(cache.layers, reference.cache.layers, strict=True):
        assert torch.equal(layer.positions, reference_layer.positions)


def test_laq_keeps_the_references_entries_and_tokens(kvc_attention, story_prompt, smollm2):
    model = kvc_attention
    _, tokenizer = smollm2
    options = {"method": "laq", "compression_ratio": 0.5, "stage1_options": {"window_size": 16},
               "inner_backend": "eager"}
    mask = torch.ones_like(story_prompt)
    n = story_prompt.shape[1]
    eos = tokenizer.eos_token_id
    reference = reference_decode(model, story_prompt, options, max_new_tokens=8, attention_mask=mask, eos_token_id=eos)
    model.compile(backend="kvc", options=options, dynamic=True)
    tokens = lookahead_generate(model, story_prompt, options, 8, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(tokens, reference.tokens)
    cache = CompressedCache()
    with torch.no_grad():
        out = model(story_prompt, attention_mask=mask, position_ids=prompt_position_ids(story_prompt, mask),
                    **with_cache(cache), use_cache=True)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        lookahead_stage(CompressionConfig.from_options(options), decode_step(model, cache), cache, first, mask, eos)
    for layer, reference_layer in zip(cache.layers, reference.cache.layers, strict=True):
        assert layer.get_seq_length() == n and (layer.positions < n).all()  # no pseudo token left
        assert torch.equal(layer.positions, reference_layer.positions[..., : n // 2])
