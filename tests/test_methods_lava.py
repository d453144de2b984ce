"""LAVa: the value-scaled window score, the normalised entropy, and the layer budgets it gives,
each on a case small enough to check by hand; then the compiled path against the reference."""

import math

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile import CompressedCache, CompressionConfig, reference_prefill
from kvc_compile.compression.prefill import compress_layers_jointly
from kvc_compile.methods.base import PROTECTED, ScoreInputs
from kvc_compile.methods.lava import LAVa, normalized_entropy
from kvc_compile.transformers_compat import with_cache

ONE_ROW = torch.ones(1, 4, dtype=torch.bool)


def test_score_is_window_attention_times_the_heads_largest_value_norm_max_over_the_group():
    torch.manual_seed(0)
    # One KV head shared by two query heads; 3 prefix tokens and a 1-token window; no smoothing.
    queries, keys, values = torch.randn(1, 2, 4, 2), torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    scores = LAVa(window_size=1, kernel_size=1).score(ScoreInputs(queries, keys, values, ONE_ROW, 0))
    largest_value_norm = max(values[0, 0, i].abs().sum().item() for i in range(3))  # prefix only
    for i in range(3):
        per_head = []
        for h in range(2):  # the last query's softmax over all 4 keys, at key i
            logits = [queries[0, h, 3] @ keys[0, 0, j] / math.sqrt(2) for j in range(4)]
            per_head.append(math.exp(logits[i]) / sum(math.exp(z) for z in logits))
        assert scores[0, 0, i].item() == pytest.approx(max(per_head) * largest_value_norm, rel=1e-5)
    assert scores[0, 0, 3] == PROTECTED


def test_normalized_entropy_by_hand():
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert normalized_entropy(torch.ones(1, 1, 4), valid).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([[[5.0, 0, 0, 0]]]), valid).item() == pytest.approx(0.0)
    # p = (1/4, 3/4) over two real entries (the padding ones do not count): H / log 2.
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    padded = torch.tensor([[False, False, True, True]])
    assert normalized_entropy(torch.tensor([[[9.0, 9.0, 1.0, 3.0]]]), padded).item() == pytest.approx(expected)


def layer_scores(*prefixes: list[float]) -> list[torch.Tensor]:
    """One KV head per layer: the given prefix scores, then a 1-token window."""
    return [torch.tensor([[prefix + [PROTECTED]]]) for prefix in prefixes]


def test_layer_budgets_follow_entropy_with_cumulative_rounding():
    method = LAVa(window_size=1)
    valid = torch.ones(1, 5, dtype=torch.bool)
    # Entropies 1 (uniform over 4) and 1/2 (uniform over 2 of 4): shares 2/3 and 1/3 of L * (B - w) = 2 * 2.
    # Per layer floor(8/3) = 2 and floor(4/3) = 1 would lose a slot; cumulative rounding gives 2 and 4 - 2 = 2.
    scores = layer_scores([1.0, 1, 1, 1], [1.0, 1, 0, 0])
    assert method.layer_budgets(scores, valid, n_kept=3).tolist() == [[3, 3]]  # + the window
    # Three layers, entropies 1, 1/2, 1/2: shares 1/2, 1/4, 1/4 of 3 * 4 = 12 -> 6, 3, 3, but a layer
    # keeps at most its 4 prefix tokens; what it cannot use is not handed on.
    scores = layer_scores([1.0, 1, 1, 1], [1.0, 1, 0, 0], [0, 0, 2.0, 2.0])
    assert method.layer_budgets(scores, valid, n_kept=5).tolist() == [[5, 4, 4]]
    # A layer whose scores sit on one token has entropy 0 and keeps only its window.
    scores = layer_scores([1.0, 1, 1, 1], [0, 7.0, 0, 0])
    assert method.layer_budgets(scores, valid, n_kept=3).tolist() == [[5, 1]]


def test_joint_compression_keeps_each_layers_budget_and_frees_the_rest():
    torch.manual_seed(1)
    method = LAVa(window_size=1, alpha_safeguard=0.0)
    keys = [torch.randn(1, 1, 5, 2) for _ in range(2)]
    values = [torch.randn(1, 1, 5, 2) for _ in range(2)]
    valid = torch.ones(1, 5, dtype=torch.bool)
    scores = layer_scores([4.0, 3, 2, 1], [0, 7.0, 0, 0])  # budgets 5 (all) and 1 (the window)
    first, second = compress_layers_jointly(method, 3, scores, keys, values, valid)
    assert first.positions.tolist() == [[[0, 1, 2, 3, 4]]] and torch.equal(first.keys, keys[0].view(1, 1, 5, 2))
    assert second.positions.tolist() == [[[4]]] and torch.equal(second.values[0, 0, 0], values[1][0, 0, 4])
    assert first.keys.untyped_storage().nbytes() + second.keys.untyped_storage().nbytes() == 2 * 3 * 2 * 4


def test_rows_of_a_batch_get_their_own_layer_budgets_padded_to_the_longest():
    method = LAVa(window_size=1, alpha_safeguard=0.0)
    keys = [torch.randn(2, 1, 5, 2) for _ in range(2)]
    valid = torch.ones(2, 5, dtype=torch.bool)
    uniform, peaked = [1.0, 1, 1, 1, PROTECTED], [0, 7.0, 0, 0, PROTECTED]
    scores = [torch.tensor([[uniform], [peaked]]), torch.tensor([[peaked], [uniform]])]
    first, second = compress_layers_jointly(method, 3, scores, keys, keys, valid)
    # Row 0 keeps 5 entries in layer 0 and 1 in layer 1, row 1 the other way round: 5 slots each layer.
    assert (first.heads >= 0).sum(dim=-1).flatten().tolist() == [5, 1]
    assert (second.heads >= 0).sum(dim=-1).flatten().tolist() == [1, 5]
    assert first.heads[1, 0, 1:].tolist() == [-1] * 4  # padding slots: attended by no head


def test_uniform_layer_allocation_gives_every_layer_the_average_and_bad_choices_are_named():
    assert not LAVa(layer_allocation="uniform").budgets_across_layers
    with pytest.raises(ValueError, match="entropy, uniform"):
        LAVa(layer_allocation="pyramid")


def test_compiled_lava_keeps_the_references_layer_budgets():
    model = tiny_model("qwen2", attn_implementation="kvc", num_hidden_layers=3)
    ids = random_prompt(1, 48, seed=5)
    opts = {"method": "lava", "compression_ratio": 0.5, "window_size": 4, "inner_backend": "eager"}
    reference = reference_prefill(model, ids, opts)
    compiled = torch.compile(model, backend="kvc", options=opts, dynamic=True)
    cache = CompressedCache()
    with torch.no_grad():
        compiled(ids, use_cache=True, **with_cache(cache))
    counts = [layer.keys.shape[-2] for layer in cache.layers]
    for layer, positions, heads in zip(cache.layers, reference.kept_indices, reference.kept_heads, strict=True):
        assert torch.equal(layer.positions, positions) and torch.equal(layer.heads, heads)
    n_kept = CompressionConfig.from_options(opts).kept_length(48)
    assert sum(counts) == 3 * 2 * n_kept  # layers x kv_heads x average budget, exactly
    assert len(set(counts)) > 1  # the layers' entropies differ, so do their budgets
