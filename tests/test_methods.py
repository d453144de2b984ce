"""Each method's formula pinned on a case small enough to check by hand."""

import dataclasses
import math

import pytest
import torch
from conftest import random_prompt, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc_compile import reference_prefill
from kvc_compile.compression.prefill import compress_layer
from kvc_compile.config import CompressionConfig
from kvc_compile.methods.adakv import AdaKV
from kvc_compile.methods.base import OutputProjectionNotFoundError, ScoreInputs
from kvc_compile.methods.criticalkv import CriticalKV
from kvc_compile.methods.keydiff import KeyDiff
from kvc_compile.methods.knorm import KNorm
from kvc_compile.methods.lagkv import LagKV
from kvc_compile.methods.random import Random
from kvc_compile.methods.scoring import output_l1_norms
from kvc_compile.methods.selection import select_two_stage_head_adaptive, select_uniform
from kvc_compile.methods.snapkv import SnapKV
from kvc_compile.methods.streamingllm import StreamingLLM


def inputs(keys, queries=None, valid=None, values=None, layer_idx=0):
    keys = torch.as_tensor(keys, dtype=torch.float32)
    queries = keys.new_ones(keys.shape) if queries is None else torch.as_tensor(queries, dtype=torch.float32)
    valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool) if valid is None else valid
    return ScoreInputs(queries, keys, keys if values is None else values, valid, layer_idx)


# SnapKV, one head, head_dim 1, window 2, queries 1 -> logit of key j is k_j.
# keys [0, ln 3, 0, 0, 0, 0]: the query at position 4 sees exp-weights [1, 3, 1, 1, 1] (sum 7), the one at
# position 5 [1, 3, 1, 1, 1, 1] (sum 8). Prefix votes (mean over the two queries), in units of 1/112:
# j=0: (1/7 + 1/8)/2 = 15, j=1: 45, j=2: 15, j=3: 15.
SNAP_KEYS = [[[[0.0], [math.log(3)], [0.0], [0.0], [0.0], [0.0]]]]


def test_snapkv_votes_without_pooling():
    scores = SnapKV(window_size=2, kernel_size=1).score(inputs(SNAP_KEYS))
    expected = torch.tensor([15, 45, 15, 15]) / 112
    torch.testing.assert_close(scores[0, 0, :4], expected)
    assert torch.isinf(scores[0, 0, 4:]).all()  # the window is always kept


def test_snapkv_average_pooling_counts_padding():
    # kernel 3, zero padding counted: j=0 (0+15+45)/3=20, j=1 (15+45+15)/3=25, j=2 25, j=3 (15+15+0)/3=10.
    scores = SnapKV(window_size=2, kernel_size=3, pooling="avg").score(inputs(SNAP_KEYS))
    torch.testing.assert_close(scores[0, 0, :4], torch.tensor([20, 25, 25, 10]) / 112)


def test_snapkv_max_pooling():
    scores = SnapKV(window_size=2, kernel_size=3, pooling="max").score(inputs(SNAP_KEYS))
    torch.testing.assert_close(scores[0, 0, :4], torch.tensor([45, 45, 45, 15]) / 112)


def test_snapkv_averages_votes_over_the_gqa_group():
    keys = torch.tensor(SNAP_KEYS)
    # Two query heads share the KV head; the second has zero queries, so its attention is uniform over what it sees:
    # position 4 sees 5 keys (1/5 each), position 5 sees 6 (1/6): prefix vote (1/5 + 1/6)/2 = 11/60 each.
    queries = torch.cat([torch.ones(1, 1, 6, 1), torch.zeros(1, 1, 6, 1)], dim=1)
    scores = SnapKV(window_size=2, kernel_size=1).score(inputs(keys, queries))
    expected = (torch.tensor([15, 45, 15, 15]) / 112 + 11 / 60) / 2
    torch.testing.assert_close(scores[0, 0, :4], expected)


def test_snapkv_padding_gets_no_attention_and_no_vote():
    keys = torch.tensor([[[[5.0], [0.0], [math.log(3)], [0.0], [0.0], [0.0], [0.0]]]])
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    scores = SnapKV(window_size=2, kernel_size=1).score(inputs(keys, valid=valid))
    # With the padded key masked out this is the hand case above shifted by one position.
    torch.testing.assert_close(scores[0, 0, 1:5], torch.tensor([15, 45, 15, 15]) / 112)
    assert scores[0, 0, 0] == 0


def test_streamingllm_keeps_sinks_and_recent_tokens():
    keys = torch.randn(1, 2, 10, 4)
    sink = StreamingLLM(n_sink=2)
    kept = select_uniform(sink.score(inputs(keys)), torch.ones(1, 10, dtype=torch.bool), 6)
    assert kept[0, 0].tolist() == [0, 1, 6, 7, 8, 9]
    assert kept[0, 1].tolist() == [0, 1, 6, 7, 8, 9]


def test_streamingllm_sinks_start_at_the_first_real_token():
    keys = torch.randn(1, 1, 10, 4)
    valid = torch.tensor([[False, False] + [True] * 8])
    kept = select_uniform(StreamingLLM(n_sink=2).score(inputs(keys, valid=valid)), valid, 5)
    assert kept[0, 0].tolist() == [2, 3, 7, 8, 9]


def test_knorm_keeps_the_smallest_keys():
    keys = torch.tensor([[[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.3, 0.4]]]])  # norms 5, 1, 2, 0.5
    scores = KNorm().score(inputs(keys))
    torch.testing.assert_close(scores[0, 0], torch.tensor([-5.0, -1.0, -2.0, -0.5]))
    kept = select_uniform(scores, torch.ones(1, 4, dtype=torch.bool), 2)
    assert kept[0, 0].tolist() == [1, 3]


def test_keydiff_keeps_the_keys_least_like_the_mean_direction():
    # Unit keys [1, 0], [1, 0], [0, 1] (the first also scaled by 3: only directions count). Their mean
    # is [2/3, 1/3], of norm sqrt(5)/3, so the cosines are 2/sqrt(5), 2/sqrt(5) and 1/sqrt(5).
    keys = torch.tensor([[[[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]]]])
    scores = KeyDiff().score(inputs(keys))
    torch.testing.assert_close(scores[0, 0], -torch.tensor([2.0, 2.0, 1.0]) / math.sqrt(5))
    assert select_uniform(scores, torch.ones(1, 3, dtype=torch.bool), 1)[0, 0].tolist() == [2]
    # Left padding does not move the anchor: a padded [0, 1] key in front changes no real key's score.
    padded = torch.cat([torch.tensor([[[[0.0, 5.0]]]]), keys], dim=2)
    valid = torch.tensor([[False, True, True, True]])
    torch.testing.assert_close(KeyDiff().score(inputs(padded, valid=valid))[0, 0, 1:], scores[0, 0])


# LagKV, 1 sink, chunks of 2 tokens, head_dim 2, values = keys (their scores average to the keys'):
# chunk 0 (positions 1-2) is normalised by chunk 1's channel range (min [0, 0], max [1, 2]): [0.5, 1] ->
# [0.5, 0.5] (std 0), [1, 0] -> [1, 0] (std 0.71), ranks 0 and 1, scores 0 and 1/2. Chunk 1 by chunk 2's
# (min [0, 0], max [2, 2]): [0, 0] -> std 0, [1, 2] -> [0.5, 1] (std 0.35), scores 0 and 1/2. The sink
# and chunk 2, the last (no lag), score 1.
LAG_KEYS = [[[[9.0, 9.0], [0.5, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [2.0, 2.0]]]]


def test_lagkv_ranks_each_chunk_against_the_next():
    method = LagKV(n_sink=1, lag_size=2)
    scores = method.score(inputs(LAG_KEYS))
    torch.testing.assert_close(scores[0, 0], torch.tensor([1.0, 0.0, 0.5, 0.0, 0.5, 1.0, 1.0]))
    assert select_uniform(scores, torch.ones(1, 7, dtype=torch.bool), 5)[0, 0].tolist() == [0, 2, 4, 5, 6]
    # A left-padded row scores its real tokens as the row alone does: chunks start at its first token.
    padded = torch.cat([torch.full((1, 1, 3, 2), 7.0), torch.tensor(LAG_KEYS)], dim=2)
    valid = torch.tensor([[False] * 3 + [True] * 7])
    torch.testing.assert_close(method.score(inputs(padded, valid=valid))[0, 0, 3:], scores[0, 0])
    # Shorter than n_sink + 2 chunks: nothing to compare, so the sink and the newest tokens are kept.
    short = method.score(inputs(torch.tensor(LAG_KEYS)[:, :, :4]))
    torch.testing.assert_close(short[0, 0], torch.tensor([1.0, 0.0, 1 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="lag_size must be >= 1"):
        LagKV(lag_size=0)


def test_random_is_seeded_per_layer_and_seed():
    keys = torch.randn(2, 2, 50, 4)
    first = Random(seed=3).score(inputs(keys, layer_idx=1))
    assert torch.equal(first, Random(seed=3).score(inputs(keys, layer_idx=1)))
    assert not torch.equal(first, Random(seed=4).score(inputs(keys, layer_idx=1)))
    assert not torch.equal(first, Random(seed=3).score(inputs(keys, layer_idx=0)))


def test_selection_sorts_and_never_prefers_padding():
    scores = torch.tensor([[[9.0, 8.0, 1.0, 3.0, 2.0, 7.0]]])
    valid = torch.tensor([[False, False, True, True, True, True]])
    assert select_uniform(scores, valid, 3).tolist() == [[[3, 4, 5]]]
    # Forced to keep more than the row's real tokens: the padding slots come first.
    assert select_uniform(scores, valid, 5)[0, 0, 1:].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("n_kept", [3, 8])
def test_compress_layer_gathers_kept_tokens(n_kept):
    keys, values = torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)
    q = torch.randn(2, 4, 8, 4)
    valid = torch.ones(2, 8, dtype=torch.bool)
    kept_keys, kept_values, kept, heads = compress_layer(KNorm(), n_kept, ScoreInputs(q, keys, values, valid, 0))
    assert (heads == torch.arange(2)[:, None]).all()
    assert kept_keys.shape == (2, 2, n_kept, 4)
    for b in range(2):
        for h in range(2):
            assert torch.equal(kept_keys[b, h], keys[b, h, kept[b, h]])
            assert torch.equal(kept_values[b, h], values[b, h, kept[b, h]])
    assert kept_keys.data_ptr() != keys.data_ptr()  # custom-op outputs never alias inputs


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    pad=st.integers(0, 39),
    kept_fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_selection_properties(n, pad, kept_fraction, seed):
    """Exactly n_kept distinct ascending indices; padding only when the row has too few real tokens."""
    pad = min(pad, n - 1)
    n_kept = max(1, int(n * kept_fraction))
    scores = torch.randn(1, 2, n, generator=torch.Generator().manual_seed(seed))
    valid = torch.arange(n)[None] >= pad
    kept = select_uniform(scores, valid, n_kept)
    assert kept.shape == (1, 2, n_kept)
    assert (kept.diff(dim=-1) > 0).all()
    padding_kept = (kept < pad).sum(dim=-1)
    assert (padding_kept == max(0, n_kept - (n - pad))).all()


def test_output_norms_average_each_group_through_o_proj():
    # One KV head, two query heads of head_dim 2, hidden 2. Values v0 = [1, 0], v1 = [0, 2]. Head 0's slice
    # of o_proj is the identity (L1 norms 1 and 2), head 1's is [[1, 1], [1, -1]] (W v0 = [1, 1]: 2;
    # W v1 = [2, -2]: 4). Averaged over the group: 1.5 and 3.
    values = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    weight = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, -1.0]])
    torch.testing.assert_close(output_l1_norms(values, weight), torch.tensor([[[1.5, 3.0]]]))


def test_criticalkv_keeps_a_first_share_by_the_scorer_and_the_rest_by_value_weighted_scores():
    # SnapKV on SNAP_KEYS (window 2, no pooling) scores the prefix [15, 45, 15, 15] / 112 and the window inf.
    # o_proj [[1], [1]] makes each value's norm 2|v|: values [0.5, 0.5, 2, 1, 0, 0] give norms [1, 1, 4, 2, 0, 0],
    # so the second stage scores the prefix about [15, 45, 60, 30] / 112. Keeping 4: the first stage's
    # int(4 * 0.5) = 2 are the window (4, 5), the value-weighted rest 2 and 1. SnapKV alone keeps 0, 1, 4, 5.
    method = CriticalKV(scorer_options={"window_size": 2, "kernel_size": 1})
    values = torch.tensor([0.5, 0.5, 2.0, 1.0, 0.0, 0.0]).reshape(1, 1, 6, 1)
    site = dataclasses.replace(inputs(SNAP_KEYS, values=values), output_weight=torch.tensor([[1.0], [1.0]]))
    first, second = method.score(site)[:, 0, 0]
    torch.testing.assert_close(first[:4], torch.tensor([15.0, 45.0, 15.0, 15.0]) / 112)
    torch.testing.assert_close(second[:4], (first[:4] + 1e-4) * torch.tensor([1.0, 1.0, 4.0, 2.0]))
    assert torch.isinf(second[4:]).all()  # a zero-norm window is still kept
    assert compress_layer(method, 4, site).positions[0, 0].tolist() == [1, 2, 4, 5]
    snapkv = SnapKV(window_size=2, kernel_size=1)
    assert compress_layer(snapkv, 4, site).positions[0, 0].tolist() == [0, 1, 4, 5]
    # All of the budget by the scorer's own ranking: the inner scorer's selection.
    whole_first = CriticalKV(scorer_options={"window_size": 2, "kernel_size": 1}, first_stage_ratio=1.0)
    assert compress_layer(whole_first, 4, site).positions[0, 0].tolist() == [0, 1, 4, 5]


def test_two_stage_head_adaptive_selection_by_hand():
    # Two KV heads, four tokens, 2 kept per head on average, no safeguard. The first-stage scores
    # [10, 9, 8, 0] and [1, .5, .2, .1] give head 0 three of the layer's four slots and head 1 one.
    # Head 0 keeps floor(3 / 2) = 1 by the first scores (token 0), then its best two by the second
    # scores [0, 1, 5, 7] (tokens 3 and 2); head 1 keeps floor(1 / 2) = 0 first, then token 1 ([0, 3, 1, 2]).
    first = torch.tensor([[[10.0, 9.0, 8.0, 0.0], [1.0, 0.5, 0.2, 0.1]]])
    second = torch.tensor([[[0.0, 1.0, 5.0, 7.0], [0.0, 3.0, 1.0, 2.0]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    kept = select_two_stage_head_adaptive(first, second, valid, 2, alpha_safeguard=0.0, first_share=0.5)
    assert kept[0].tolist() == [0, 2, 3, 4 + 1]
    # Token 0 as padding: the layer's best four are 9, 8 (head 0) and .5, .2 (head 1), two each; each head
    # keeps its best real token by the first scores (token 1) and its best other by the second (token 3).
    padded = torch.tensor([[False, True, True, True]])
    kept = select_two_stage_head_adaptive(first, second, padded, 2, alpha_safeguard=0.0, first_share=0.5)
    assert kept[0].tolist() == [1, 3, 4 + 1, 4 + 3]


def test_criticalkv_on_a_model_without_o_proj_is_refused_with_the_reason():
    model = tiny_model("llama", attn_implementation="kvc")
    for layer in model.model.layers:
        layer.self_attn.o_proj = torch.nn.Identity()  # hidden size = heads * head_dim: the model still runs
    options = {"method": "criticalkv", "compression_ratio": 0.5, "scorer_options": {"window_size": 4},
               "inner_backend": "eager"}
    with pytest.raises(OutputProjectionNotFoundError, match="no linear o_proj|none was found"):
        reference_prefill(model, random_prompt(1, 20), options)
    compiled = torch.compile(model, backend="kvc", options=options, dynamic=True)
    with pytest.raises(Exception, match="no linear o_proj follows the attention of layer 0"), torch.no_grad():
        compiled(random_prompt(1, 20), use_cache=True)


def test_criticalkv_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="first_stage_ratio must be in"):
        CriticalKV(first_stage_ratio=1.5)
    with pytest.raises(ValueError, match="ranks in two stages.*criticaladakv"):
        AdaKV(scorer="criticalkv")
    with pytest.raises(OutputProjectionNotFoundError, match="o_proj"):
        CriticalKV(scorer_options={"window_size": 2}).score(inputs(SNAP_KEYS))
    with pytest.raises(ValueError, match="cannot compress while decoding: it weighs entries by the layer's output"):
        CompressionConfig.from_options({"method": "criticalkv", "budget": 8, "decoding_interval": 4, "target_size": 8})
