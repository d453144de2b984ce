"""The shared-prefill path: one prefill per prompt, every configuration compressed from it and
decoded in batches, gives the answers each configuration gets on its own."""

import pytest
import torch
from conftest import random_prompt, tiny_model

import kvc_compile.eval.shared_prefill as shared
import kvc_compile.reference as reference
from kvc_compile.eval.leaderboard import answer_ids
from kvc_compile.eval.shared_prefill import ReservedLayer, answer_configs, stack_caches

SMALL = {"window_size": 8, "inner_backend": "eager"}
# Dense caches of one shape (snapkv, knorm, h2o at 0.5) share a batch, tova at 0.75 has its own;
# adakv and pyramidkv keep different counts per head and layer and share a padded packed batch.
STACKED = [
    None,
    {"method": "snapkv", "compression_ratio": 0.5, **SMALL},
    {"method": "knorm", "compression_ratio": 0.5, "inner_backend": "eager"},
    {"method": "h2o", "compression_ratio": 0.5, "inner_backend": "eager"},
    {"method": "tova", "compression_ratio": 0.75, "inner_backend": "eager"},
    {"method": "adakv", "compression_ratio": 0.5, "scorer_options": {"window_size": 8}, "inner_backend": "eager"},
    {"method": "pyramidkv", "compression_ratio": 0.5, **SMALL},
]
# Decode alone, with each step's queries captured: compared with the compiled path.
ALONE = [
    {"method": "morphkv", "budget": 40, "window_size": 4, "inner_backend": "eager"},
    {"method": "laq", "compression_ratio": 0.5, **SMALL, "stage1_options": {"window_size": 8}},
    # The question (one chunk of 6 tokens) brings the layers past the threshold: its last token anchors
    # the rotary tables the recent queries are un-rotated with.
    {"method": "expected_attention", "compression_ratio": 0.5, "decoding_window": 6, "decoding_interval": 4,
     "target_size": 40, "inner_backend": "eager"},
    # Packed: the prefill keeps 2 x 48 entries per row, past 2 x (40 + 4): the question chunk's step evicts.
    {"method": "adakv", "compression_ratio": 0.5, "scorer_options": {"window_size": 8}, "decoding_interval": 4,
     "target_size": 40, "inner_backend": "eager"},
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation="kvc")


@pytest.mark.parametrize("query_aware", [False, True])
def test_batched_answers_equal_each_configuration_on_its_own(model, monkeypatch, query_aware):
    context, question = random_prompt(1, 96, seed=3), random_prompt(1, 6, seed=4)
    if query_aware:  # the question is compressed with the context; the prefill predicts the first token
        context, question = torch.cat([context, question], dim=1), None
    stacked = []
    monkeypatch.setattr(shared, "stack_caches", lambda caches: stacked.append(len(caches)) or stack_caches(caches))
    answers = answer_configs(model, context, question, STACKED, 10)
    assert sorted(stacked) == [2, 3]  # the packed pair and the dense trio were decoded as batches
    for options, got in zip(STACKED, answers, strict=True):
        expected = answer_ids(model, context, question, options, 10, path="reference")
        assert torch.equal(got, expected), options
    assert len({tuple(a[0].tolist()) for a in answers}) > 2  # compression changed some answers


@pytest.mark.parametrize("options", ALONE, ids=lambda o: o["method"])
def test_decode_time_compression_and_lookahead_answer_like_the_compiled_path(model, options):
    context, question = random_prompt(1, 96, seed=5), random_prompt(1, 6, seed=6)
    got = answer_configs(model, context, question, [options], 12)[0]
    model.compile(backend="kvc", options=options, dynamic=True)
    try:
        expected = answer_ids(model, context, question, options, 12, path="compiled")
    finally:
        model._compiled_call_impl = None
    assert torch.equal(got, expected)


def test_a_method_is_scored_once_for_all_its_ratios(model, monkeypatch):
    calls = []
    original = reference.prefill_scores
    monkeypatch.setattr(shared, "prefill_scores", lambda config, prefill: calls.append(config.method)
                        or original(config, prefill))
    configs = [{"method": "snapkv", "compression_ratio": r, **SMALL} for r in (0.25, 0.5, 0.75)]
    configs.append({"method": "snapkv", "compression_ratio": 0.5, "window_size": 4, "inner_backend": "eager"})
    context, question = random_prompt(1, 64, seed=7), random_prompt(1, 4, seed=8)
    answers = answer_configs(model, context, question, configs, 4)
    assert calls == ["snapkv", "snapkv"]  # once per distinct set of method options
    for options, got in zip(configs, answers, strict=True):
        assert torch.equal(got, answer_ids(model, context, question, options, 4, path="reference"))


def test_answers_stop_at_eos(model):
    context, question = random_prompt(1, 48, seed=9), random_prompt(1, 4, seed=10)
    free = answer_configs(model, context, question, [None], 8)[0]
    eos = int(free[0, 2])
    stopped = answer_configs(model, context, question, [None], 8, eos_token_id=eos)[0]
    first_eos = free[0].tolist().index(eos)
    assert stopped[0].tolist() == free[0, : first_eos + 1].tolist()


def test_misuse_is_refused_with_the_reason(model):
    with pytest.raises(ValueError, match="one prompt at a time"):
        answer_configs(model, random_prompt(2, 16), None, [None], 2)
    prefill = reference.capture_prefill(model, random_prompt(1, 40, seed=11))
    short = reference.compress_prefill(model, prefill, {"method": "knorm", "compression_ratio": 0.5}).cache
    full = reference.compress_prefill(model, prefill, None).cache
    with pytest.raises(ValueError, match="same number of entries per head"):
        stack_caches([short, full])
    layer = ReservedLayer.reserving(full.layers[0], extra=1)
    layer.update(*(torch.zeros(1, layer.kv_heads, 1, layer.keys.shape[-1]) for _ in range(2)))
    with pytest.raises(RuntimeError, match="reserve more room"):
        layer.update(*(torch.zeros(1, layer.kv_heads, 1, layer.keys.shape[-1]) for _ in range(2)))
