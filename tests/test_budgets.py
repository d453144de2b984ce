"""Per-head and per-layer budgets: the selection arithmetic, the packed layout, the packed decode
attention, and the memory they really free (measured from tensor storage)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_prompt, tiny_model

from kvc_compile import CompressedCache, CompressionConfig, packed_attention, reference_generate, reference_prefill
from kvc_compile.cache import CompressedLayer
from kvc_compile.compression.prefill import compress_layer
from kvc_compile.methods.base import ScoreInputs
from kvc_compile.methods.knorm import KNorm
from kvc_compile.methods.pyramidkv import PyramidKV
from kvc_compile.methods.selection import select_head_adaptive
from kvc_compile.transformers_compat import CACHE_ARG, output_cache, with_cache

PROMPT = 40
ADAKV = {"method": "adakv", "scorer_options": {"window_size": 8}, "compression_ratio": 0.5, "inner_backend": "eager"}


def test_head_adaptive_selection_by_hand():
    # Two heads, budget 2 each (4 in all), floor int(2 * 0.5) = 1 per head.
    # Floors: head 0 keeps its 9 (pos 0), head 1 its 1 (pos 0). The two free slots go to the best of the
    # rest of the layer, 8 and 7, both in head 0: head 0 keeps 3 tokens, head 1 keeps 1.
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0], [1.0, 0.0, 0.0, 0.5]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert select_head_adaptive(scores, valid, 2, 0.5).tolist() == [[0, 1, 2, 4]]
    # Without the floor head 1 gets nothing: the top 4 of the layer are all in head 0.
    assert select_head_adaptive(scores, valid, 2, 0.0).tolist() == [[0, 1, 2, 3]]


def test_head_adaptive_selection_never_keeps_padding_before_real_tokens():
    scores = torch.tensor([[[9.0, 8.0, 1.0, 2.0], [7.0, 6.0, 3.0, 0.5]]])
    valid = torch.tensor([[False, False, True, True]])
    # Budget 2 in all: head 1 pos 2 (3.0, flat 4 + 2) and head 0 pos 3 (2.0); 9, 8, 7, 6 are padding.
    assert select_head_adaptive(scores, valid, 1, 0.0).tolist() == [[3, 6]]


def test_packed_compression_labels_entries_and_frees_evicted_memory():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :6] = False  # row 1 has 4 real tokens, fewer than the 5 per head kept on average

    class AdaKNorm(KNorm):
        layout = "packed"

        def select(self, scores, valid, n_kept):
            return select_head_adaptive(scores, valid, n_kept, 0.2)

    out = compress_layer(AdaKNorm(), 5, ScoreInputs(keys.repeat(1, 2, 1, 1), keys, values, valid, 0))
    assert out.keys.shape == (2, 1, 15, 4) and out.heads.shape == (2, 1, 15)
    for b in range(2):
        for t in range(15):
            head, pos = int(out.heads[b, 0, t]), int(out.positions[b, 0, t])
            if head >= 0:
                assert torch.equal(out.keys[b, 0, t], keys[b, head, pos])
                assert torch.equal(out.values[b, 0, t], values[b, head, pos])
            else:
                assert not valid[b, pos]  # only padding slots are unlabelled
    assert (out.heads[1] >= 0).sum() == 12  # every real (head, token) pair of row 1 is kept
    # What the tensors hold is the budget: 3 heads x 5 tokens x 4 dims per row, nothing padded per head.
    assert out.keys.untyped_storage().nbytes() == 2 * 15 * 4 * 4


def test_pyramid_layer_budgets_by_hand():
    # Average 12 per head with a window of 2: P = 10, top layer 10 // 5 = 2, bottom 2 * 10 - 2 = 18,
    # three layers ramp 18, 10, 2 prefix tokens -> 20, 12, 4 with the window; total 36 = 3 x 12.
    method = PyramidKV(window_size=2, beta=5)
    assert [method.layer_kept_length(12, 40, layer, 3) for layer in range(3)] == [20, 12, 4]
    # The bottom layer cannot keep more than the prompt's prefix: 2P - P//beta = 38 -> clipped to 30 - 2.
    budgets = [method.layer_kept_length(22, 30, layer, 4) for layer in range(4)]
    assert budgets[0] == 30 and sum(budgets) == 4 * 22
    assert budgets == sorted(budgets, reverse=True)


@pytest.mark.parametrize("n_layers", [2, 5, 7])
def test_pyramid_budgets_sum_exactly_for_any_depth(n_layers):
    method = PyramidKV(window_size=4, beta=20)
    for n, n_kept in [(100, 50), (333, 77), (64, 9)]:
        budgets = [method.layer_kept_length(n_kept, n, layer, n_layers) for layer in range(n_layers)]
        assert sum(budgets) == n_layers * n_kept and max(budgets) <= n


def test_packed_attention_matches_per_head_attention_over_each_heads_entries():
    torch.manual_seed(1)
    batch, kv_heads, group, d = 2, 3, 2, 8
    counts = [[4, 1, 6], [2, 5, 4]]  # rows hold the same number of entries, heads do not
    total = sum(counts[0])
    keys, values = torch.randn(batch, 1, total + kv_heads, d), torch.randn(batch, 1, total + kv_heads, d)
    heads = torch.tensor([[h for h, c in enumerate(row) for _ in range(c)] + list(range(kv_heads)) for row in counts])
    heads = heads[:, None]
    query = torch.randn(batch, kv_heads * group, 1, d)
    out = packed_attention(query, keys, values, heads.int(), kv_heads, d**-0.5)
    assert out.shape == (batch, 1, kv_heads * group, d)
    for b in range(batch):
        for qh in range(kv_heads * group):
            mine = heads[b, 0] == qh // group
            expected = F.scaled_dot_product_attention(
                query[b, qh][None, None], keys[b, 0, mine][None, None], values[b, 0, mine][None, None]
            )
            torch.testing.assert_close(out[b, 0, qh], expected[0, 0, 0])


def test_packed_attention_of_several_new_tokens_is_causal_among_them():
    torch.manual_seed(2)
    keys, values = torch.randn(1, 1, 5 + 2 * 2, 4), torch.randn(1, 1, 9, 4)
    heads = torch.tensor([[[0, 1, 1, 0, 1, 0, 1, 0, 1]]], dtype=torch.int32)  # 5 prompt entries, 2 new tokens
    query = torch.randn(1, 2, 2, 4)
    out = packed_attention(query, keys, values, heads, 2, 0.5)
    # New token 0 of head 0 sees prompt entries 0, 3 and its own entry 5, not token 1's entry 7.
    visible = [0, 3, 5]
    expected = F.scaled_dot_product_attention(
        query[:, :1, :1], keys[:, :, visible], values[:, :, visible], scale=0.5
    )
    torch.testing.assert_close(out[0, 0, 0], expected[0, 0, 0])


@pytest.mark.parametrize("method", ["adakv", "pyramidkv", "lava"])
def test_compiled_budgets_free_memory_and_generate_like_the_reference(method):
    model = tiny_model("llama", attn_implementation="kvc")
    ids = random_prompt(2, PROMPT)
    opts = {"method": method, "compression_ratio": 0.5, "inner_backend": "eager"}
    opts |= {"scorer_options": {"window_size": 8}} if method == "adakv" else {"window_size": 8}
    reference = reference_prefill(model, ids, opts)
    compiled = torch.compile(model, backend="kvc", options=opts, dynamic=True)
    with torch.no_grad():
        full = output_cache(model(ids, use_cache=True))
        cache = CompressedCache()
        compiled(ids, use_cache=True, **with_cache(cache))
    n_kept = CompressionConfig.from_options(opts).kept_length(PROMPT)
    row_totals = torch.zeros(2, dtype=torch.long)
    for layer, kept, heads in zip(cache.layers, reference.kept_indices, reference.kept_heads, strict=True):
        assert layer.packed
        assert torch.equal(layer.positions, kept) and torch.equal(layer.heads, heads)
        row_totals += (layer.heads >= 0).sum(dim=(1, 2))
        full_bytes = full.layers[0].keys.untyped_storage().nbytes()
        assert layer.keys.untyped_storage().nbytes() == full_bytes * layer.keys.shape[-2] // (2 * PROMPT)
    # Over the model, each row keeps exactly the budget: kv_heads x n_kept per layer on average.
    assert row_totals.tolist() == [2 * 2 * n_kept] * 2
    expected = reference_generate(model, ids, opts, max_new_tokens=8)
    model.compile(backend="kvc", options=opts, dynamic=True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, **with_cache(CompressedCache()))
    assert torch.equal(out[:, PROMPT:], expected)


def test_head_budgets_with_left_padding_generate_like_the_reference():
    model = tiny_model("qwen2", attn_implementation="kvc")
    ids = random_prompt(2, PROMPT)
    mask = torch.ones_like(ids)
    mask[1, :28] = 0  # 12 real tokens, fewer than the 20 kept per head on average
    ids[mask == 0] = 0
    reference = reference_prefill(model, ids, ADAKV, attention_mask=mask)
    for positions, heads in zip(reference.kept_indices, reference.kept_heads, strict=True):
        assert ((heads[1] >= 0) == (positions[1] >= 28)).all()  # padding slots are labelled -1
    expected = reference_generate(model, ids, ADAKV, max_new_tokens=8, attention_mask=mask)
    model.compile(backend="kvc", options=ADAKV, dynamic=True)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **with_cache(CompressedCache()))
    assert torch.equal(out[:, PROMPT:], expected)


def test_packed_layout_needs_compressed_cache():
    model = tiny_model("llama", attn_implementation="kvc")
    compiled = torch.compile(model, backend="kvc", options=ADAKV)
    with torch.no_grad(), pytest.raises(Exception, match=f"{CACHE_ARG}=kvc_compile.CompressedCache"):
        compiled(random_prompt(1, PROMPT), use_cache=True)


def test_packed_layout_read_by_dense_attention_explains_the_fix():
    model = tiny_model("llama", attn_implementation="sdpa")
    prefill = reference_prefill(model, random_prompt(1, PROMPT), ADAKV)
    assert isinstance(prefill.cache.layers[0], CompressedLayer) and prefill.cache.layers[0].packed
    with torch.no_grad(), pytest.raises(TypeError, match="attn_implementation='kvc'"):
        model(torch.tensor([[5]]), **with_cache(prefill.cache), use_cache=True)
