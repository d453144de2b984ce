"""The trained retrieval fixture: near-perfect with the full cache, chance when the queried pair is
evicted, and the compiled path answers as the reference does."""

import pytest
import torch

from kvc_compile import CompressedCache
from kvc_compile.compression.layout import CompressedKV
from kvc_compile.eval.retrieval import PAIRS, VALUES, load_fixture, retrieval_accuracy, retrieval_batch
from kvc_compile.transformers_compat import with_cache

SAMPLES = 256


@pytest.fixture(scope="module")
def fixture_model():
    return load_fixture()


def test_full_cache_retrieves_almost_always(fixture_model):
    assert retrieval_accuracy(fixture_model, samples=SAMPLES) >= 0.95


@torch.no_grad()
def answers_after_eviction(model, context, query, keep):
    """Prefill ``context``, keep only the positions ``keep`` [batch, k] in every layer, then ask."""
    cache = CompressedCache()
    model(context, **with_cache(cache), use_cache=True)
    n = context.shape[1]
    for layer in cache.layers:
        index = keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        heads = torch.arange(layer.keys.shape[1], dtype=torch.int32)[None, :, None].expand(len(keep), -1, keep.shape[1])
        positions = keep[:, None, :].expand_as(heads).to(torch.int32)
        kept = CompressedKV(layer.keys.gather(2, index), layer.values.gather(2, index), positions, heads.clone())
        layer.set_compressed(kept, logical_length=n, kv_heads=layer.keys.shape[1])
    position = torch.full((len(context), 1), n)
    out = model(query, **with_cache(cache), position_ids=position, cache_position=position[0], use_cache=True)
    return out.logits[:, -1].argmax(-1)


def test_evicting_the_queried_pair_drops_to_chance(fixture_model):
    context, query, answer = retrieval_batch(SAMPLES, torch.Generator().manual_seed(7))
    # Which pair is asked: the key token equal to the query (positions 1 + 2i).
    asked = (context[:, 1 : 1 + 2 * PAIRS : 2] == query).float().argmax(-1)
    everything = torch.arange(context.shape[1]).expand(SAMPLES, -1)
    drop_asked = torch.stack([
        everything[row][(everything[row] != 1 + 2 * asked[row]) & (everything[row] != 2 + 2 * asked[row])]
        for row in range(SAMPLES)
    ])
    other = (asked + 1) % PAIRS
    drop_other = torch.stack([
        everything[row][(everything[row] != 1 + 2 * other[row]) & (everything[row] != 2 + 2 * other[row])]
        for row in range(SAMPLES)
    ])
    kept_other = (answers_after_eviction(fixture_model, context, query, drop_other) == answer).float().mean()
    kept_asked = (answers_after_eviction(fixture_model, context, query, drop_asked) == answer).float().mean()
    assert kept_other >= 0.9  # evicting another pair does not matter
    assert kept_asked <= 3 / len(VALUES)  # chance is 1 / 30


def test_compiled_fixture_answers_like_the_reference(fixture_model):
    from kvc_compile import reference_prefill

    context, query, _ = retrieval_batch(32, torch.Generator().manual_seed(3))
    options = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 4, "inner_backend": "eager"}
    n = context.shape[1]
    position = torch.full((32, 1), n)
    with torch.no_grad():
        reference = reference_prefill(fixture_model, context, options)
        expected = fixture_model(query, **with_cache(reference.cache), position_ids=position,
                                 cache_position=position[0], use_cache=True).logits[:, -1].argmax(-1)
        compiled = torch.compile(fixture_model, backend="kvc", options=options, dynamic=True)
        cache = CompressedCache()
        compiled(context, **with_cache(cache), use_cache=True)
        got = compiled(query, **with_cache(cache), position_ids=position, cache_position=position[0],
                       use_cache=True).logits[:, -1].argmax(-1)
    for layer, positions in zip(cache.layers, reference.kept_indices, strict=True):
        assert torch.equal(layer.positions[..., : positions.shape[-1]], positions)  # then the query's entry
    assert torch.equal(got, expected)


def test_fixture_leaderboard_cells(fixture_model, tmp_path):
    """kvc-eval's second model: the full cache answers every sample; keeping 1 token in 8 by key
    norm (the question comes after compression) loses almost every asked pair."""
    from kvc_compile.eval.leaderboard import run_grid, summarize
    from kvc_compile.eval.retrieval import FIXTURE_OPTIONS, FIXTURE_TASK, FixtureTasks

    cells = run_grid(fixture_model, FixtureTasks(), tmp_path, ["knorm"], [0.875], [FIXTURE_TASK], 16,
                     path="reference", extra_options=FIXTURE_OPTIONS)
    scores = {(r.method, r.ratio): r.mean for r in summarize(tmp_path, cells, "fixture")}
    assert scores[("full cache", 0.0)] == 1.0
    assert scores[("knorm", 0.875)] <= 0.25


def test_a_model_without_the_kvc_pass_is_not_scored_as_compressed(fixture_model):
    from kvc_compile.eval.leaderboard import answer_ids

    context, query, _ = retrieval_batch(1, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="kvc pass did not run"):  # compiled path, but not compiled
        answer_ids(fixture_model, context, query, {"method": "knorm", "compression_ratio": 0.5}, 1)


def test_the_fixture_refuses_query_aware_scoring(tmp_path, capsys):
    from kvc_compile.cli.eval import main

    assert main(["--model", "retrieval-fixture", "--query-aware", "--out", str(tmp_path)]) == 2
    assert "drop --query-aware" in capsys.readouterr().err


@pytest.mark.parametrize("options", [{"method": "morphkv", "budget": 12, "window_size": 2},
                                     {"method": "laq", "compression_ratio": 0.5, "window_size": 2}])
def test_the_reference_path_refuses_what_only_the_compiled_path_runs(fixture_model, options):
    from kvc_compile.eval.leaderboard import answer_ids

    context, query, _ = retrieval_batch(1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="use --path compiled"):  # a reference cache would never evict
        answer_ids(fixture_model, context, query, options, 1, path="reference")
