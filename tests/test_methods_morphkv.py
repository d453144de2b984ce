"""MorphKV and periodic decode-time compression: the formula by hand, the configuration errors, and
the compiled decode graphs against the eager reference."""

import math

import pytest
import torch
from conftest import compiled_greedy_steps, random_prompt, tiny_model
from torch._dynamo.utils import counters

from kvc_compile import CompressionConfig
from kvc_compile.compression.decoding import decode_score_inputs
from kvc_compile.compression.layout import unpack_per_head
from kvc_compile.methods.base import PROTECTED, ScoreInputs
from kvc_compile.methods.compactor import recent_attention
from kvc_compile.methods.expected_attention import ExpectedAttention, mean_future_rotation, rotation_matrix
from kvc_compile.methods.h2o import H2O
from kvc_compile.methods.morphkv import MorphKV, morph_scores
from kvc_compile.methods.rotary import rotary_tables_before, rotate_half
from kvc_compile.ops.decode import compress_decode_packed_site, compress_decode_site, last_queries, shift_in
from kvc_compile.reference import reference_decode

LN3 = math.log(3.0)


def hand_case():
    """One KV head shared by two query heads, head_dim 1 (scale 1), two candidates with keys 0 and ln 3.

    Head 0's queries (1, 0) give softmax rows (1/4, 3/4) and (1/2, 1/2); head 1's (0, 2) give
    (1/2, 1/2) and (1/10, 9/10). The group max per query row: (1/2, 3/4) and (1/2, 9/10).
    """
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 2, 2, 1)
    candidates = torch.tensor([0.0, LN3]).view(1, 1, 2, 1)
    return queries, candidates


def test_morph_scores_by_hand():
    queries, candidates = hand_case()
    valid, voters = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    summed = morph_scores(queries, candidates, valid, voters, "sum")
    maxed = morph_scores(queries, candidates, valid, voters, "max")
    torch.testing.assert_close(summed, torch.tensor([[[1.0, 1.65]]]))
    torch.testing.assert_close(maxed, torch.tensor([[[0.5, 0.9]]]))


def test_padding_candidates_leave_the_softmax_and_padding_queries_do_not_vote():
    queries, candidates = hand_case()
    # A padding candidate with a huge key: outside the normaliser, it changes nothing and scores 0.
    padded = torch.cat([candidates, torch.full((1, 1, 1, 1), 50.0)], dim=2)
    valid = torch.tensor([[True, True, False]])
    scores = morph_scores(queries, padded, valid, torch.ones(1, 2, dtype=torch.bool), "sum")
    torch.testing.assert_close(scores, torch.tensor([[[1.0, 1.65, 0.0]]]))
    # Only the first query row votes: (1/2, 3/4).
    first_only = morph_scores(queries, candidates, valid[:, :2], torch.tensor([[True, False]]), "sum")
    torch.testing.assert_close(first_only, torch.tensor([[[0.5, 0.75]]]))


def test_morphkv_scores_candidates_with_the_window_before_the_newest_token():
    """window 3, 8 tokens: candidates 0..3, voters are the queries of tokens 5 and 6, 4..7 protected."""
    torch.manual_seed(0)
    queries, keys = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    valid = torch.ones(1, 8, dtype=torch.bool)
    scores = MorphKV(window_size=3, fusion="max").score(ScoreInputs(queries, keys, keys, valid, 0))
    expected = morph_scores(queries[:, :, 5:7], keys[:, :, :4], valid[:, :4], valid[:, 5:7], "max")
    torch.testing.assert_close(scores[..., :4], expected)
    assert (scores[..., 4:] == PROTECTED).all()


def test_decode_step_evicts_exactly_one_entry_and_keeps_the_newest():
    config = CompressionConfig.from_options({"method": "morphkv", "budget": 6, "window_size": 3})
    torch.manual_seed(1)
    keys, values = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    positions = torch.tensor([0, 2, 5, 9, 10, 11, 12], dtype=torch.int32).expand(1, 2, 7)
    buffer = torch.randn(1, 4, 3, 8)
    kept_keys, kept_values, kept_positions = compress_decode_site(config, buffer, keys, values, positions, None, 0, 1)
    assert kept_keys.shape == (1, 2, 6, 8)
    # Candidates are the first 3 entries (all but the newest window + 1); their best 2 stay.
    scores = morph_scores(buffer[:, :, :2], keys[:, :, :3], torch.ones(1, 3, dtype=torch.bool),
                          torch.ones(1, 2, dtype=torch.bool), "sum")
    evicted = scores.argmin(dim=-1)
    for head in range(2):
        expected = [p for i, p in enumerate(positions[0, head].tolist()) if i != int(evicted[0, head])]
        assert kept_positions[0, head].tolist() == expected
        survivors = positions[0, head] != positions[0, head, evicted[0, head]]
        assert torch.equal(kept_keys[0, head], keys[0, head][survivors])


def test_query_buffer_keeps_the_newest_queries():
    query = torch.arange(5.0).view(1, 1, 5, 1)
    buffer = last_queries(query, 3)
    assert buffer.flatten().tolist() == [2.0, 3.0, 4.0] and buffer.is_contiguous()
    assert last_queries(query[:, :, :2], 3).flatten().tolist() == [0.0, 0.0, 1.0]  # a short prompt: zeros first
    assert shift_in(buffer, torch.full((1, 1, 1, 1), 9.0)).flatten().tolist() == [3.0, 4.0, 9.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "morphkv", "compression_ratio": 0.5}, "constant-size cache: give budget"),
        ({"method": "snapkv", "compression_ratio": 0.5, "decoding_interval": 8}, "needs both decoding_interval"),
        ({"method": "snapkv", "budget": 64, "decoding_interval": 0, "target_size": 64}, "positive integer"),
        ({"method": "h2o", "budget": 64, "decoding_interval": 8, "target_size": 64},
         r"must exceed h2o's window of recent tokens \(256\), which it scores from"),
        ({"method": "h2o", "budget": 64, "decoding_window": 0}, "decoding_window must be an integer >= 1"),
        ({"method": "compactor", "budget": 64, "decoding_interval": 8, "target_size": 64},
         r"must exceed compactor's window of recent tokens \(256\), which it scores from"),
        ({"method": "expected_attention", "budget": 64, "decoding_interval": 8, "target_size": 256},
         r"must exceed expected_attention's window of recent tokens \(256\), which it scores from"),
        ({"method": "lava", "budget": 64, "decoding_interval": 8, "target_size": 64},
         "every layer's scores at once.*layer_allocation='uniform'.*Methods that can: adacurdkv, adakv, chunkkv, "
         "compactor, curdkv, expected_attention, h2o, keydiff, knorm, lagkv, morphkv, obcache, pyramidkv, random, "
         "snapkv, streamingllm, tova$"),
        ({"method": "adakv", "budget": 64, "decoding_interval": 8, "target_size": 64}, "must exceed"),
        ({"method": "snapkv", "budget": 64, "decoding_interval": 8, "target_size": 64}, "must exceed"),
        ({"method": "morphkv", "budget": 32, "window_size": 32}, "must exceed"),
        ({"method": "morphkv", "budget": 64, "window_size": 1}, "at least 2"),
    ],
)
def test_bad_decode_time_options_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig.from_options(options)


def padded_batch(length: int = 40):
    ids = random_prompt(2, length, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def decode_like_the_reference(model, ids, mask, opts, steps):
    """Greedy steps of the compiled model, checked against the eager reference: the same tokens, and
    every layer's entry positions and buffer of recent queries. Returns the cache, and the layers'
    lengths and the cache's bytes after each step."""
    reference = reference_decode(model, ids, opts, max_new_tokens=steps + 1, attention_mask=mask)
    counters.clear()
    tokens, cache, lengths, sizes = compiled_greedy_steps(model, opts, ids, mask, steps)
    assert torch.equal(tokens, reference.tokens[:, :steps])
    for layer, reference_layer in zip(cache.layers, reference.cache.layers, strict=True):
        assert torch.equal(layer.positions, reference_layer.positions)
        # Compiled decode attention reads the cache with native GQA (GroupDecodeAttention), the eager
        # reference through transformers' repeat: the same sums in another order, so float-close.
        torch.testing.assert_close(layer.recent_queries, reference_layer.recent_queries, rtol=1e-5, atol=1e-6)
        assert layer.packed == reference_layer.packed
        if layer.packed:
            assert torch.equal(layer.heads, reference_layer.heads)
    return cache, lengths, sizes


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_morphkv_keeps_a_constant_cache_and_the_references_tokens(arch):
    model = tiny_model(arch, attn_implementation="kvc")
    ids, mask = padded_batch()
    opts = {"method": "morphkv", "budget": 20, "window_size": 4, "fusion": "max", "inner_backend": "eager"}
    cache, lengths, sizes = decode_like_the_reference(model, ids, mask, opts, 24)
    assert all(step == [20, 20] for step in lengths) and len(set(sizes)) == 1  # constant, measured from storage
    assert counters["stats"]["unique_graphs"] == 2  # one prefill graph, one decode graph for every step
    # Newest window + current token always stay: positions 59..63 hold the last 5 decoded tokens.
    assert cache.layers[0].positions[:, :, -5:].tolist() == [[list(range(59, 64))] * 2] * 2


PERIODIC = {
    "snapkv": {"method": "snapkv", "window_size": 4},
    # Not a window scorer: its statistics come from the newest 6 queries, un-rotated.
    "expected_attention": {"method": "expected_attention", "decoding_window": 6, "n_future_positions": 16},
    # Reads every query at prefill; while decoding, the newest 6 vote.
    "h2o": {"method": "h2o", "decoding_window": 6},
    # While decoding the newest 6 queries are one chunk over the cache; keys un-rotated at their positions.
    "compactor": {"method": "compactor", "decoding_window": 6, "chunk_size": 8, "sketch_size": 8,
                  "protected_first": 2, "protected_last": 2},
}


@pytest.mark.parametrize(("method", "arch"), [("snapkv", "llama"), ("expected_attention", "llama"),
                                              ("expected_attention", "qwen3"), ("h2o", "qwen3"),
                                              ("compactor", "llama")])
def test_periodic_compression_goes_back_to_the_target_with_the_references_tokens(method, arch):
    model = tiny_model(arch, attn_implementation="kvc")
    ids, mask = padded_batch()
    opts = {**PERIODIC[method], "compression_ratio": 0.5, "decoding_interval": 3, "target_size": 16,
            "inner_backend": "eager"}
    _, lengths, _ = decode_like_the_reference(model, ids, mask, opts, 12)
    # 20 prompt entries + 1 reach 16 + 3: compressed to 16, then 17, 18, 16, 17, 18, 16, ...
    assert [step[0] for step in lengths] == [16, 17, 18] * 4


# What every head of every layer still holds after 12 steps, per row (row 1 has 6 padding tokens first).
NEWEST = [set(range(48, 52))] * 2  # the window of 4 kept at the last compression, and what came after
SINKS = [set(range(4)), set(range(6, 10))]  # CurDKV keeps the first 4 real tokens


@pytest.mark.parametrize(("options", "arch", "lengths", "held"), [
    # Heads compete for 2 x 16 entries per row: 40 prompt tokens keep 2 x 20, grow by 2 per step and
    # are brought back to 32 when they reach 2 x (16 + 3).
    ({"method": "adakv", "scorer_options": {"window_size": 4}}, "llama", [[32, 32], [34, 34], [36, 36]] * 4, NEWEST),
    ({"method": "adacurdkv", "local_window_size": 4}, "qwen3", [[32, 32], [34, 34], [36, 36]] * 4, SINKS),
    # LAVa's heads share each layer's budget; its entropy allocation across layers is refused while decoding.
    ({"method": "lava", "layer_allocation": "uniform", "window_size": 4, "kernel_size": 3}, "qwen3",
     [[32, 32], [34, 34], [36, 36]] * 4, NEWEST),
    # Layer targets 28 and 4 per head (the pyramid over 2 x 16, window 4 on top): each layer is
    # compressed when it reaches its own target + 3.
    ({"method": "pyramidkv", "window_size": 4}, "llama", [[56, 10], [58, 12], [60, 8]] * 4, NEWEST),
])
def test_periodic_compression_of_packed_layers_keeps_the_references_tokens_and_heads(options, arch, lengths, held):
    model = tiny_model(arch, attn_implementation="kvc")
    ids, mask = padded_batch()
    opts = {**options, "compression_ratio": 0.5, "decoding_interval": 3, "target_size": 16, "inner_backend": "eager"}
    cache, measured, _ = decode_like_the_reference(model, ids, mask, opts, 12)
    assert measured == lengths
    for layer in cache.layers:
        for row in range(2):
            for head in range(2):
                assert held[row] <= set(layer.positions[row, 0][layer.heads[row, 0] == head].tolist())


def test_packed_entries_unpack_right_aligned_per_head():
    """Head 0 holds 4 entries, head 1 three, one padding entry (-1); the last two are a decoded token's."""
    heads = torch.tensor([0, 0, 0, 1, 1, -1, 0, 1]).view(1, 1, 8)
    slot, valid = unpack_per_head(heads, kv_heads=2)
    # Rows of 8 slots: head 0's entries in slots 4-7 of row 0, head 1's in 5-7 of row 1, padding in row 2.
    assert slot.tolist() == [[4, 5, 6, 8 + 5, 8 + 6, 16 + 7, 7, 8 + 7]]
    assert valid.int().tolist() == [[[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]]


@pytest.mark.parametrize(("alpha", "heads", "positions", "kept_norms"), [
    # Without a floor the 4 smallest norms win: 1, 2, 3 (head 0) and 4 (head 1).
    (0.0, [0, 0, 0, 1], [0, 2, 5, 3], [1.0, 2.0, 3.0, 4.0]),
    # A floor of 2 per head (alpha 1 x target 2) gives head 1 its best two, 5 and 4.
    (1.0, [0, 0, 1, 1], [0, 2, 1, 3], [1.0, 2.0, 5.0, 4.0]),
])
def test_packed_decode_eviction_by_hand(alpha, heads, positions, kept_norms):
    """AdaKV over KNorm (keeps the smallest key norms) on one packed row of 2 KV heads, target 2 per head."""
    entry_heads = torch.tensor([0, 0, 0, 1, 1, -1, 0, 1], dtype=torch.int32).view(1, 1, 8)
    entry_positions = torch.tensor([0, 2, 5, 1, 3, 4, 6, 6], dtype=torch.int32).view(1, 1, 8)
    norms = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0, 0.0, 6.0, 7.0])  # the padding entry's 0 must not count
    keys = norms.view(1, 1, 8, 1).expand(1, 1, 8, 2) / math.sqrt(2)
    config = CompressionConfig.from_options({"method": "adakv", "scorer": "knorm", "alpha_safeguard": alpha,
                                             "budget": 2, "decoding_interval": 2, "target_size": 2})
    buffer = torch.zeros(1, 4, 1, 2)  # KNorm reads no query
    kept_keys, kept_values, kept_heads, kept_positions = compress_decode_packed_site(
        config, buffer, keys, keys.clone(), entry_heads, entry_positions, kv_heads=2, layer_idx=0, n_layers=1)
    assert kept_heads.flatten().tolist() == heads
    assert kept_positions.flatten().tolist() == positions
    torch.testing.assert_close(kept_keys.norm(dim=-1).flatten(), torch.tensor(kept_norms))
    assert torch.equal(kept_values, kept_keys)


def test_a_one_token_prompt_starts_the_buffer_of_recent_queries():
    """A one-token prompt traces like a decode step; its query must still start the buffer."""
    model = tiny_model("llama", attn_implementation="kvc")
    ids = random_prompt(2, 1, seed=4)
    mask = torch.ones_like(ids)
    opts = {"method": "h2o", "budget": 8, "decoding_window": 4, "decoding_interval": 3, "target_size": 8,
            "inner_backend": "eager"}
    _, lengths, _ = decode_like_the_reference(model, ids, mask, opts, 12)
    assert [step[0] for step in lengths] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 8, 9, 10]


@pytest.mark.parametrize(("positions", "first_valid", "window", "expected"), [
    # Zero queries attend uniformly. The query of position 2 sees keys 0-2 (1/3 each), that of 3
    # keys 0-3 (1/4 each); keys 0-2 are seen by both, key 3 by one: (7/12) / 2 and (1/4) / 1.
    ([0, 1, 2, 3], 0, 2, [7 / 24, 7 / 24, 7 / 24, 1 / 4]),
    # Key 0 is padding: query 2 pays 1/2 to keys 1 and 2, query 3 pays 1/3 to keys 1-3.
    ([0, 1, 2, 3], 1, 2, [0.0, 5 / 12, 5 / 12, 1 / 3]),
    # Tokens 3-8 were evicted: the queries of positions 7 and 8 see keys 0-2 (1/3 each), that of 9
    # every key (1/4). By row index, the query of 7 would see only keys 0 and 1.
    ([0, 1, 2, 9], 0, 3, [11 / 36, 11 / 36, 11 / 36, 1 / 4]),
])
def test_decode_time_h2o_counts_the_buffered_queries_votes_by_position(positions, first_valid, window, expected):
    """The rows in front of the buffer (zeros) would vote too if they were counted as queries."""
    queries = torch.zeros(1, 1, 4, 2)
    keys = torch.randn(1, 1, 4, 2, generator=torch.Generator().manual_seed(0))
    valid = torch.arange(4)[None] >= first_valid
    inputs = ScoreInputs(queries, keys, keys, valid, 0, query_valid=valid & (torch.arange(4)[None] >= 4 - window),
                         positions=torch.tensor(positions).view(1, 1, 4))
    scores = H2O(decoding_window=window).score(inputs)
    torch.testing.assert_close(scores, torch.tensor([[expected]]))
    # At prefill every real row votes: key 0 gets 1 + 1/2 + 1/3 + 1/4 from four rows.
    prefill = H2O().score(ScoreInputs(queries, keys, keys, torch.ones(1, 4, dtype=torch.bool), 0))
    torch.testing.assert_close(prefill[0, 0, 0], torch.tensor(25 / 48))


def test_decode_time_compactor_votes_with_the_recent_queries_as_one_chunk():
    """``hand_case``'s two query heads over keys (0, ln 3), no scale, no causal mask: head 0's rows give
    (1/4, 3/4) + (1/2, 1/2), head 1's (1/2, 1/2) + (1/10, 9/10); the group mean of the column sums."""
    queries, keys = hand_case()
    valid = torch.ones(1, 2, dtype=torch.bool)
    both = recent_attention(queries, keys, valid, valid, window=2)
    torch.testing.assert_close(both, torch.tensor([[[27 / 40, 53 / 40]]]))
    # A row that holds no query casts no vote: only the second rows count.
    newest = recent_attention(queries, keys, valid, torch.tensor([[False, True]]), window=2)
    torch.testing.assert_close(newest, torch.tensor([[[3 / 10, 7 / 10]]]))


def test_decode_time_keys_are_unrotated_at_their_own_positions():
    """Entries at positions 0, 3, 4, 9 (tokens between were evicted), the step's token at 9: the key
    tables counted back from its tables by each entry's distance un-rotate every key exactly."""
    model = tiny_model("llama")
    rotary = model.model.rotary_emb
    positions = torch.tensor([[0, 3, 4, 9], [2, 5, 6, 9]], dtype=torch.int32).view(1, 2, 4)  # two KV heads
    pre_rope = torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = (t[:, None] for t in rotary(torch.zeros(1, 1), positions.view(2, 4).long()))
    keys = pre_rope * cos.view(1, 2, 4, 16) + rotate_half(pre_rope) * sin.view(1, 2, 4, 16)
    step_cos, step_sin = (t[:, None] for t in rotary(torch.zeros(1, 1), torch.tensor([[9]])))
    config = CompressionConfig.from_options({"method": "compactor", "budget": 3, "decoding_window": 2,
                                             "decoding_interval": 1, "target_size": 3})
    inputs = decode_score_inputs(config.method_impl, torch.zeros(1, 4, 2, 16), keys, keys,
                                 torch.ones(1, 4, dtype=torch.bool), positions, 0, 1,
                                 (step_cos, step_sin, rotary.inv_freq))
    torch.testing.assert_close(inputs.unrotate_keys(), pre_rope, atol=1e-5, rtol=0)


def test_rotary_tables_counted_back_match_the_models_rotary_embedding():
    model = tiny_model("llama")
    rotary = model.model.rotary_emb
    like = torch.zeros(2, 1)
    # Two rows at different positions (left padding shifts a row's positions), anchored on their last token.
    positions = torch.tensor([[30, 31, 32, 33, 34, 35], [20, 21, 22, 23, 24, 25]])
    cos, sin = rotary(like, positions)
    anchor_cos, anchor_sin = rotary(like, positions[:, -2:])  # a step of two tokens: its last one anchors
    back_cos, back_sin = rotary_tables_before(anchor_cos[:, None], anchor_sin[:, None], rotary.inv_freq, 6)
    torch.testing.assert_close(back_cos, cos[:, None], atol=1e-5, rtol=0)
    torch.testing.assert_close(back_sin, sin[:, None], atol=1e-5, rtol=0)
    # A YaRN-like attention scaling m multiplies every table: it carries over to every row.
    scaled_cos, _ = rotary_tables_before(1.5 * anchor_cos[:, None], 1.5 * anchor_sin[:, None], rotary.inv_freq, 6)
    torch.testing.assert_close(scaled_cos, 1.5 * cos[:, None], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="inverse frequencies"):
        rotary_tables_before(anchor_cos[:, None], anchor_sin[:, None], rotary.inv_freq[:-1], 6)


def test_decode_time_expected_attention_takes_its_statistics_from_the_recent_queries():
    """Recent queries that are one pre-RoPE query rotated to their positions have mean that query and
    no spread; the queries in front of the buffer (zeros) and the sinks' rows are left out."""
    model = tiny_model("llama")
    rotary = model.model.rotary_emb
    torch.manual_seed(3)
    head_dim, m, window = 16, 12, 4
    pre_rope = torch.randn(1, 4, 1, head_dim)
    positions = torch.arange(40 - window, 40)[None]
    cos, sin = (t[:, None] for t in rotary(torch.zeros(1, 1), positions))
    buffer = pre_rope * cos + rotate_half(pre_rope) * sin  # post-RoPE, as the cache buffers them
    keys = torch.randn(1, 2, m, head_dim)
    valid = torch.ones(1, m, dtype=torch.bool)
    method = ExpectedAttention(decoding_window=window)
    tables = rotary_tables_before(cos[:, :, -1:], sin[:, :, -1:], rotary.inv_freq, m)
    queries = torch.nn.functional.pad(buffer, (0, 0, m - window, 0))
    inputs = ScoreInputs(queries, keys, keys, valid, 0, query_valid=torch.arange(m)[None] >= m - window,
                         cos=tables[0], sin=tables[1])
    mean, cov = method.query_statistics(inputs)
    rotation = rotation_matrix(mean_future_rotation(*tables, valid, method.n_future_positions))
    torch.testing.assert_close(mean, torch.einsum("ij,bhj->bhi", rotation[0], pre_rope[:, :, 0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(cov, torch.zeros_like(cov), atol=1e-4, rtol=0)
    # The op builds the same inputs from the step's tables and the inverse frequencies.
    config = CompressionConfig.from_options({"method": "expected_attention", "budget": 8, "decoding_window": window,
                                             "decoding_interval": 4, "target_size": 8})
    kept = compress_decode_site(config, buffer, keys, keys, torch.arange(m, dtype=torch.int32).expand(1, 2, m), None,
                                0, 1, (cos, sin, rotary.inv_freq))
    expected = method.select(method.score(inputs), valid, 8)
    assert torch.equal(kept[2], expected.to(torch.int32))
    with pytest.raises(ValueError, match="rotary tables"):
        compress_decode_site(config, buffer, keys, keys, kept[2], None, 0, 1)
