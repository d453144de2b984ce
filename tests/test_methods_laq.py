"""Lookahead Q-Cache: stage 2 by hand, compiled rollout against the eager reference, and the pseudo
tokens leaving no trace in the output or the final cache."""

import math

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile import CompressedCache, CompressionConfig, lookahead_generate
from kvc_compile.compression.layout import CompressedKV, gather_kept
from kvc_compile.lookahead import decode_step, greedy_tokens, lookahead_stage, prompt_position_ids
from kvc_compile.methods.base import PROTECTED
from kvc_compile.methods.laq import LAQ
from kvc_compile.reference import reference_decode
from kvc_compile.transformers_compat import output_cache, with_cache

LN3 = math.log(3.0)
OPTIONS = {
    "method": "laq", "budget": 16, "lookahead": 4, "window_size": 2, "stage1_options": {"window_size": 4},
    "inner_backend": "eager",
}


def test_stage2_scores_by_hand():
    """head_dim 1, keys (0, ln 3, 0): a voter q=1 gives (1/5, 3/5, 1/5), a voter q=0 gives thirds."""
    keys = torch.tensor([0.0, LN3, 0.0]).view(1, 1, 3, 1)
    voters = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    valid = torch.ones(1, 3, dtype=torch.bool)
    laq = LAQ(window_size=0, kernel_size=1)
    both = laq.lookahead_scores(keys, valid, voters, torch.tensor([[True, True]]))
    torch.testing.assert_close(both, torch.tensor([[[8 / 15, 14 / 15, 8 / 15]]]))
    first = laq.lookahead_scores(keys, valid, voters, torch.tensor([[True, False]]))
    torch.testing.assert_close(first, torch.tensor([[[0.2, 0.6, 0.2]]]))
    # LAQ++ keeps the last window_size prompt tokens whatever the votes.
    windowed = LAQ(window_size=1, kernel_size=1).lookahead_scores(keys, valid, voters, torch.tensor([[True, True]]))
    assert windowed[0, 0, 2] == PROTECTED and torch.allclose(windowed[0, 0, :2], both[0, 0, :2])


def test_laq_refuses_decode_time_compression():
    with pytest.raises(ValueError, match="second stage runs once"):
        CompressionConfig.from_options({**OPTIONS, "decoding_interval": 4, "target_size": 20})


def padded_batch():
    ids = random_prompt(2, 40, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("eos", [None, 65])
def test_compiled_laq_keeps_the_references_entries_and_tokens(arch, eos):
    model = tiny_model(arch, attn_implementation="kvc")
    ids, mask = padded_batch()
    reference = reference_decode(model, ids, OPTIONS, 10, attention_mask=mask, eos_token_id=eos)
    model.compile(backend="kvc", options=OPTIONS, dynamic=True)
    assert torch.equal(lookahead_generate(model, ids, OPTIONS, 10, attention_mask=mask, eos_token_id=eos),
                       reference.tokens)
    # Step by step, to look at the cache right after stage 2.
    config, cache = CompressionConfig.from_options(OPTIONS), CompressedCache()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=prompt_position_ids(ids, mask), **with_cache(cache),
                    use_cache=True)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        voted = lookahead_stage(config, decode_step(model, cache), cache, first, mask, eos)
    for layer, reference_layer in zip(cache.layers, reference.cache.layers, strict=True):
        assert layer.get_seq_length() == 40 and layer.keys.shape[-2] == 16  # no pseudo token is left
        assert (layer.positions < 40).all() and layer.prompt_keys is None and layer.recent_queries.shape[2] == 0
        assert torch.equal(layer.positions, reference_layer.positions[..., :16])
    if eos is None:
        assert voted.all()


def test_pseudo_tokens_never_reach_the_output_or_the_cache():
    """LAQ's tokens equal a plain greedy decode from a fresh cache holding only the kept prompt entries."""
    model = tiny_model("llama", attn_implementation="kvc")
    ids, mask = padded_batch()
    laq = reference_decode(model, ids, OPTIONS, 10, attention_mask=mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=prompt_position_ids(ids, mask), use_cache=True)
        cache = CompressedCache()
        model(ids, attention_mask=mask, position_ids=prompt_position_ids(ids, mask), **with_cache(cache),
              use_cache=True)
        for layer, full_layer, laq_layer in zip(cache.layers, output_cache(full).layers, laq.cache.layers,
                                                strict=True):
            kept = laq_layer.positions[..., :16].long()
            entries = CompressedKV(gather_kept(full_layer.keys, kept), gather_kept(full_layer.values, kept),
                                   kept.int(), laq_layer.heads)
            layer.set_compressed(entries, logical_length=40, kv_heads=2)
        first = full.logits[:, -1].argmax(-1, keepdim=True)
        plain = greedy_tokens(decode_step(model.forward, cache), first, mask, 10)
    assert torch.equal(plain, laq.tokens)


def test_decoding_a_laq_cache_outside_the_lookahead_loop_is_refused():
    model = tiny_model("llama", attn_implementation="kvc")
    model.compile(backend="kvc", options=OPTIONS, dynamic=True)
    with pytest.raises(Exception, match="lookahead_generate"):
        with torch.no_grad():
            model.generate(random_prompt(1, 40), max_new_tokens=3, do_sample=False, **with_cache(CompressedCache()))
