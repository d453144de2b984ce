"""CurDKV, AdaCurDKV, Compactor and context calibration, each formula pinned on a case small enough
to check by hand."""

import math

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile.compression.prefill import compress_layer
from kvc_compile.eval.calibration import (
    ContextCalibration,
    context_nll,
    continuation_nll,
    fit_calibration,
    measure_quality,
)
from kvc_compile.methods import compactor
from kvc_compile.methods.adacurdkv import AdaCurDKV
from kvc_compile.methods.base import ScoreInputs
from kvc_compile.methods.compactor import (
    Compactor,
    chunk_attention,
    gaussian_sketch,
    key_leverage,
    leverage_scores,
    row_zscore,
)
from kvc_compile.methods.curdkv import CurDKV
from kvc_compile.methods.rotary import RotaryNotFoundError, rotate_half
from kvc_compile.transformers_compat import output_cache, with_cache


def inputs(keys, values=None, queries=None, valid=None, layer_idx=0, cos=None, sin=None, identity_rotary=True):
    keys = torch.as_tensor(keys, dtype=torch.float32)
    values = keys if values is None else torch.as_tensor(values, dtype=torch.float32)
    queries = keys.new_ones(keys.shape) if queries is None else torch.as_tensor(queries, dtype=torch.float32)
    batch, _, n, d = keys.shape
    valid = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid
    if cos is None and identity_rotary:
        cos, sin = torch.ones(batch, 1, n, d), torch.zeros(batch, 1, n, d)
    return ScoreInputs(queries, keys, values, valid, layer_idx, 1, cos, sin)


def column(values):
    """[1, 1, n, 1] from a list: one row, one head, head_dim 1."""
    return torch.tensor(values, dtype=torch.float32)[None, None, :, None]


def all_valid(batch, n):
    return torch.ones(batch, n, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- CurDKV

# One head, head_dim 1, blocks of 2 starting at position 0: {0,1} {2,3} {4} (short last block).
# keys   [1, 2, 3, 1, 2] -> squared [1, 4, 9, 1, 4] -> block-normalised [1/5, 4/5, 9/10, 1/10, 1]
# values [2, 1, 1, 1, 3] -> squared [4, 1, 1, 1, 9] -> block-normalised [4/5, 1/5, 1/2, 1/2, 1]
CUR_KEYS, CUR_VALUES = column([1, 2, 3, 1, 2]), column([2, 1, 1, 1, 3])
KEY_LEV = torch.tensor([0.2, 0.8, 0.9, 0.1, 1.0])
VALUE_LEV = torch.tensor([0.8, 0.2, 0.5, 0.5, 1.0])


def test_curdkv_kv_product_with_blocks_from_position_zero():
    # product, in units of 1/100: [16, 16, 45, 5, 100], sum 182 -> normalised by 182.
    # (Blocks aligned to the end, as in the authors' code, {0} {1,2} {3,4}, would give other numbers.)
    method = CurDKV(num_sinks=0, local_window_size=2)
    scores = method.score(inputs(CUR_KEYS, CUR_VALUES))
    torch.testing.assert_close(scores[0, 0], torch.tensor([16, 16, 45, 5, 100]) / 182)
    key_lev, value_lev = method.leverage(inputs(CUR_KEYS, CUR_VALUES))
    torch.testing.assert_close(key_lev[0, 0], KEY_LEV)
    torch.testing.assert_close(value_lev[0, 0], VALUE_LEV)


@pytest.mark.parametrize(
    "leverage_type, expected",
    [
        # (k + v) / 2 = [0.5, 0.5, 0.7, 0.3, 1.0], sum 3.0
        ("kv_avg", torch.tensor([0.5, 0.5, 0.7, 0.3, 1.0]) / 3),
        # key leverage alone, sum 3.0; value leverage alone, sum 3.0
        ("key", KEY_LEV / 3),
        ("value", VALUE_LEV / 3),
    ],
)
def test_curdkv_leverage_types(leverage_type, expected):
    method = CurDKV(num_sinks=0, local_window_size=2, leverage_type=leverage_type)
    torch.testing.assert_close(method.score(inputs(CUR_KEYS, CUR_VALUES))[0, 0], expected)


def test_curdkv_without_local_normalisation():
    # Raw squared norms: keys [1, 4, 9, 1, 4] x values [4, 1, 1, 1, 9] = [4, 4, 9, 1, 36], sum 54.
    method = CurDKV(num_sinks=0, use_local_approximation=False)
    torch.testing.assert_close(method.score(inputs(CUR_KEYS, CUR_VALUES))[0, 0], torch.tensor([4, 4, 9, 1, 36]) / 54)


def test_curdkv_sinks_are_protected_after_normalisation():
    # The first two tokens are kept whatever their score; the others keep their share of the whole row (/182).
    scores = CurDKV(num_sinks=2, local_window_size=2).score(inputs(CUR_KEYS, CUR_VALUES))[0, 0]
    assert torch.isinf(scores[:2]).all() and scores[0] > 0
    torch.testing.assert_close(scores[2:], torch.tensor([45, 5, 100]) / 182)


def test_curdkv_padding_neither_shifts_blocks_nor_enters_sums():
    # Three padding slots with huge keys in front: the real tokens score as in the unpadded hand case,
    # sinks included (counted from the first real token).
    keys = torch.cat([torch.full((1, 1, 3, 1), 100.0), CUR_KEYS], dim=2)
    values = torch.cat([torch.full((1, 1, 3, 1), 100.0), CUR_VALUES], dim=2)
    valid = torch.tensor([[False] * 3 + [True] * 5])
    scores = CurDKV(num_sinks=1, local_window_size=2).score(inputs(keys, values, valid=valid))[0, 0]
    assert torch.isinf(scores[3]) and torch.isfinite(scores[:3]).all() and torch.isfinite(scores[4:]).all()
    torch.testing.assert_close(scores[4:], torch.tensor([16, 45, 5, 100]) / 182)


def test_curdkv_all_zero_blocks_and_rows_stay_finite():
    keys = torch.zeros(1, 2, 6, 4)
    valid = torch.tensor([[False, False, True, True, True, True]])
    scores = CurDKV(num_sinks=0).score(inputs(keys, valid=valid))
    assert torch.equal(scores, torch.zeros_like(scores))


def test_curdkv_sketch_is_seeded_and_approximates_norms():
    keys, values = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    method = CurDKV(use_random_leverage=True, sketch_rank=8, seed=3)
    first = method.score(inputs(keys, values, layer_idx=1))
    assert torch.equal(first, method.score(inputs(keys, values, layer_idx=1)))
    other_seed = CurDKV(use_random_leverage=True, sketch_rank=8, seed=4)
    assert not torch.equal(first, other_seed.score(inputs(keys, values, layer_idx=1)))
    assert not torch.equal(first, method.score(inputs(keys, values, layer_idx=0)))
    # The sketch is G [16, 8] ~ N(0, 1/8) from seed + layer_idx, applied to keys and values alike.
    sketch = gaussian_sketch(16, 8, 4, torch.device("cpu"))
    no_blocks = CurDKV(use_random_leverage=True, sketch_rank=8, seed=3, use_local_approximation=False, num_sinks=0)
    key_lev, value_lev = no_blocks.leverage(inputs(keys, values, layer_idx=1))
    torch.testing.assert_close(key_lev, (keys @ sketch).square().sum(-1))
    torch.testing.assert_close(value_lev, (values @ sketch).square().sum(-1))
    # N(0, 1/r): E ||G^T x||^2 = ||x||^2 (a wide sketch estimates the norms closely).
    wide = gaussian_sketch(16, 20000, 0, torch.device("cpu"))
    x = torch.randn(3, 16)
    torch.testing.assert_close((x @ wide).square().sum(-1), x.square().sum(-1), rtol=0.05, atol=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_sinks": -1}, "num_sinks"),
        ({"leverage_type": "query"}, "leverage_type"),
        ({"sketch_rank": 0}, "sketch_rank"),
        ({"local_window_size": 0}, "local_window_size"),
    ],
)
def test_curdkv_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        CurDKV(**options)


# ------------------------------------------------------------------------------------------- AdaCurDKV

# 1-dim keys, "key" leverage, no blocks, no sinks: head 0 squared norms [100, 1 x 7] -> [100/107, 1/107 x 7];
# head 1 all equal -> 1/8 each. n_kept 4: the layer keeps 8 entries.
ADA_KEYS = torch.stack([column([10.0] + [1.0] * 7)[0, 0], torch.ones(8, 1)])[None]


@pytest.mark.parametrize(
    "alpha, counts",
    [
        # floor int(4 * 0.25) = 1 per head; the 6 other slots go to the best remaining scores: head 1's 1/8.
        (0.25, [1, 7]),
        # floor 2 per head, then 4 more from head 1.
        (0.5, [2, 6]),
        # floor 4: every head keeps its own 4, as uniform selection would.
        (1.0, [4, 4]),
    ],
)
def test_adacurdkv_shares_the_budget_between_heads(alpha, counts):
    method = AdaCurDKV(num_sinks=0, use_local_approximation=False, leverage_type="key", alpha_safeguard=alpha)
    assert method.layout == "packed"
    kept = method.select(method.score(inputs(ADA_KEYS)), all_valid(1, 8), 4)
    heads = kept // 8
    assert [int((heads == h).sum()) for h in range(2)] == counts
    assert 0 in kept[0].tolist()  # head 0's dominant token


def test_adacurdkv_packed_layer_holds_kv_heads_times_n_kept_entries():
    torch.manual_seed(0)  # independent of the tests run before it in the same process
    keys, values = torch.randn(2, 3, 32, 8), torch.randn(2, 3, 32, 8)
    layer = compress_layer(AdaCurDKV(), 8, inputs(keys, values))
    assert layer.keys.shape == (2, 1, 24, 8)
    per_head = [(layer.heads == h).sum(dim=-1) for h in range(3)]
    assert (sum(per_head) == 24).all()
    assert not all(bool((count == 8).all()) for count in per_head)  # heads really keep different counts
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaCurDKV(alpha_safeguard=1.5)


# ------------------------------------------------------------------------------------------- Compactor


def test_leverage_scores_match_the_hat_matrix_diagonal():
    # X = [[1,0],[0,1],[1,1],[0,2]]: X^T X = [[2,1],[1,6]], inverse [[6,-1],[-1,2]] / 11.
    # o = [6, 2, 6 - 1 - 1 + 2, 4 * 2] / 11 = [6, 2, 6, 8] / 11 (sums to the rank, 2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    torch.testing.assert_close(leverage_scores(x, ridge=0.0), torch.tensor([6.0, 2.0, 6.0, 8.0]) / 11)
    # Excluded rows leave the Gram matrix and score 0: the first three rows alone give [2/3, 2/3, 2/3].
    valid = torch.tensor([True, True, True, False])
    torch.testing.assert_close(leverage_scores(x, valid, ridge=0.0), torch.tensor([2, 2, 2, 0]) / 3)
    # Ridge: 1-dim x = [1, 2], o_i = x_i^2 / (5 + ridge); ridge 5 -> [0.1, 0.4].
    torch.testing.assert_close(leverage_scores(torch.tensor([[1.0], [2.0]]), ridge=5.0), torch.tensor([0.1, 0.4]))
    # A random batch against diag(X (X^T X)^{-1} X^T).
    x = torch.randn(2, 3, 30, 5, generator=torch.Generator().manual_seed(0))
    exact = torch.diagonal(x @ torch.linalg.inv(x.transpose(-1, -2) @ x) @ x.transpose(-1, -2), dim1=-2, dim2=-1)
    torch.testing.assert_close(leverage_scores(x, ridge=0.0), exact, rtol=1e-4, atol=1e-5)


def test_leverage_scores_survive_a_singular_gram_matrix(monkeypatch):
    # Two identical rows in 2 dims: rank 1, no Cholesky without jitter; the retry gives finite scores
    # close to the pseudo-inverse leverage [1/2, 1/2].
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    scores = leverage_scores(x, ridge=0.0)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.5]), rtol=1e-3, atol=1e-3)
    # With no retry left, the pseudo-inverse gives the same leverage exactly.
    monkeypatch.setattr(compactor, "CHOLESKY_TRIES", 1)
    torch.testing.assert_close(leverage_scores(x, ridge=0.0), torch.tensor([0.5, 0.5]))


def test_key_leverage_centres_over_real_tokens_only():
    # 1-dim keys [0, 2, 4] (+ a padding key 100): mean 2, centred [-2, 0, 2], Gram 8 -> [4/8, 0, 4/8].
    keys = column([100.0, 0.0, 2.0, 4.0])
    valid = torch.tensor([[False, True, True, True]])
    torch.testing.assert_close(key_leverage(keys, valid, None, ridge=0.0)[0, 0], torch.tensor([0.0, 0.5, 0.0, 0.5]))


def test_square_sketch_gives_the_exact_leverage():
    # With sketch_size == head_dim, Phi is invertible and X Phi spans the same columns as X.
    keys = torch.randn(1, 2, 24, 4, generator=torch.Generator().manual_seed(1))
    valid = all_valid(1, 24)
    sketch = gaussian_sketch(4, 4, 7, torch.device("cpu"))
    exact = key_leverage(keys, valid, None, ridge=0.0)
    torch.testing.assert_close(key_leverage(keys, valid, sketch, ridge=0.0), exact, rtol=1e-3, atol=1e-4)


def test_compactor_leverage_reads_unrotated_keys():
    batch, n, d = 1, 12, 4
    pre = torch.randn(batch, 2, n, d, generator=torch.Generator().manual_seed(2))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.3, 1.0, 0.3])
    cos, sin = angle.cos().expand(batch, 1, n, d), angle.sin().expand(batch, 1, n, d)
    rotated = pre * cos + rotate_half(pre) * sin  # RoPE, as the model applies it
    method = Compactor(sketch_size=3, seed=5)
    got = method.leverage(inputs(rotated, cos=cos, sin=sin, layer_idx=2))
    sketch = gaussian_sketch(d, 3, 7, torch.device("cpu"))
    torch.testing.assert_close(got, key_leverage(pre, all_valid(batch, n), sketch), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, key_leverage(rotated, all_valid(batch, n), sketch), rtol=1e-3, atol=1e-3)
    with pytest.raises(RotaryNotFoundError, match="compactor"):
        method.score(inputs(rotated, identity_rotary=False))
    assert Compactor.needs_rotary


# Chunk attention: one head, head_dim 4, chunks of 2, queries e_0, keys' first coordinate [0, ln3, ln3, 0, 0].
# Raw logits (no 1/sqrt(4) scale) are the first coordinates. Chunk {0,1}: both queries weigh [1/4, 3/4] (no causal
# mask: query 0 sees key 1) -> column sums [1/2, 3/2]; chunk {2,3}: [3/2, 1/2]; chunk {4} (short): [1].
LN3 = math.log(3)
CHUNK_KEYS = torch.tensor([[0.0], [LN3], [LN3], [0.0], [0.0]]) * torch.tensor([[1.0, 0.0, 0.0, 0.0]])
CHUNK_QUERIES = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(5, 4)
CHUNK_SUMS = torch.tensor([0.5, 1.5, 1.5, 0.5, 1.0])


def test_chunk_attention_is_non_causal_and_unscaled():
    got = chunk_attention(CHUNK_QUERIES[None, None], CHUNK_KEYS[None, None], all_valid(1, 5), 2)
    torch.testing.assert_close(got[0, 0], CHUNK_SUMS)


def test_chunk_attention_excludes_padding_keys_and_queries():
    # A padding token between the two tokens of a chunk would take weight; here it takes none and casts no vote.
    queries = torch.cat([CHUNK_QUERIES[:1], torch.full((1, 4), 9.0), CHUNK_QUERIES[1:2]])[None, None]
    keys = torch.cat([CHUNK_KEYS[:1], torch.full((1, 4), 9.0), CHUNK_KEYS[1:2]])[None, None]
    valid = torch.tensor([[True, False, True]])
    got = chunk_attention(queries, keys, valid, 3)
    torch.testing.assert_close(got[0, 0], torch.tensor([0.5, 0.0, 1.5]))
    # A chunk of padding only gives zeros, not NaN.
    assert torch.equal(chunk_attention(queries, keys, torch.zeros(1, 3, dtype=torch.bool), 2), torch.zeros(1, 1, 3))


def test_compactor_attention_term_gqa_value_norms_and_pooling():
    # Two query heads share the KV head; the second has zero queries (uniform weights: column sums 1).
    # GQA mean: ([1/2, 3/2, 3/2, 1/2, 1] + 1) / 2 = [3/4, 5/4, 5/4, 3/4, 1].
    # times ||v|| = [2, 1, 2, 1, 1] -> [3/2, 5/4, 5/2, 3/4, 1]; avg pool 3 with zero ends:
    # [(0 + 3/2 + 5/4), (3/2 + 5/4 + 5/2), (5/4 + 5/2 + 3/4), (5/2 + 3/4 + 1), (3/4 + 1 + 0)] / 3.
    queries = torch.stack([CHUNK_QUERIES, torch.zeros(5, 4)])[None]
    values = torch.tensor([2.0, 1.0, 2.0, 1.0, 1.0])[:, None] * torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    got = Compactor(chunk_size=2).attention(inputs(CHUNK_KEYS[None, None], values[None, None], queries))
    expected = torch.tensor([11 / 4, 21 / 4, 18 / 4, 17 / 4, 7 / 4]) / 3
    torch.testing.assert_close(got[0, 0], expected)


def test_row_zscore_uses_real_entries_of_each_row():
    # Row 0: [1, 2, 3] -> mean 2, unbiased std 1 -> [-1, 0, 1]. Row 1: padding 100 excluded, [2, 4] -> mean 3,
    # std sqrt(2) -> [-1/sqrt2, 1/sqrt2], padding 0.
    x = torch.tensor([[[1.0, 2.0, 3.0]], [[100.0, 2.0, 4.0]]])
    valid = torch.tensor([[True, True, True], [False, True, True]])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(row_zscore(x, valid), torch.tensor([[[-1.0, 0.0, 1.0]], [[0.0, -r, r]]]))


def test_compactor_blends_z_scores_and_protects_the_ends():
    batch, n = 2, 20
    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(batch, 2, n, 8, generator=generator), torch.randn(batch, 2, n, 8, generator=generator)
    queries = torch.randn(batch, 4, n, 8, generator=generator)
    case = inputs(keys, values, queries)
    method = Compactor(sketch_size=4, chunk_size=8, protected_first=0, protected_last=0)
    valid = all_valid(batch, n)
    expected = row_zscore(method.attention(case), valid) + 0.3 * row_zscore(method.leverage(case), valid)
    torch.testing.assert_close(method.score(case), expected)
    protected = Compactor(sketch_size=4, chunk_size=8, protected_first=3, protected_last=2).score(case)
    assert torch.isinf(protected[..., :3]).all() and torch.isinf(protected[..., -2:]).all()
    torch.testing.assert_close(protected[..., 3:-2], expected[..., 3:-2])


def test_compactor_padding_gives_finite_scores_and_the_unpadded_result():
    # Row 1 is row 0's first 15 tokens behind 5 padding slots of garbage: its real tokens score exactly as
    # the 15-token prompt alone (chunks, centring, z-scores and protection all start at the first real token).
    generator = torch.Generator().manual_seed(4)
    n, pad = 20, 5
    keys, values = torch.randn(1, 2, n, 8, generator=generator), torch.randn(1, 2, n, 8, generator=generator)
    queries = torch.randn(1, 4, n, 8, generator=generator)

    def padded(x):
        garbage = torch.full((1, x.shape[1], pad, 8), 50.0)
        return torch.cat([x, torch.cat([garbage, x[:, :, : n - pad]], dim=2)])

    valid = torch.tensor([[True] * n, [False] * pad + [True] * (n - pad)])
    method = Compactor(sketch_size=4, chunk_size=4)
    scores = method.score(inputs(padded(keys), padded(values), padded(queries), valid=valid))
    assert torch.isfinite(scores[1, :, pad + 8 : n - 4]).all() and not torch.isnan(scores).any()
    alone = method.score(inputs(keys[:, :, : n - pad], values[:, :, : n - pad], queries[:, :, : n - pad]))
    torch.testing.assert_close(scores[1, :, pad:], alone[0])
    assert not torch.isinf(scores[1, :, :pad]).any()  # padding is never protected


def test_compactor_is_seeded():
    case = inputs(torch.randn(1, 2, 30, 8), queries=torch.randn(1, 2, 30, 8))
    first = Compactor(sketch_size=4).score(case)
    assert torch.equal(first, Compactor(sketch_size=4).score(case))
    assert not torch.equal(first, Compactor(sketch_size=4, seed=1).score(case))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sketch_size": 0}, "sketch_size"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"blending": -0.1}, "blending"),
        ({"blending": float("nan")}, "blending"),
        ({"protected_first": -1}, "protected_first"),
        ({"protected_last": -2}, "protected_last"),
    ],
)
def test_compactor_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        Compactor(**options)


# ----------------------------------------------------------------------------------------- calibration


def test_quality_and_retention_by_hand():
    # b = ln 4 (alpha 0): e^{-b} = 1/4; f(1/2) = (e^{-b/2} - 1/4) / (1 - 1/4) = (1/2 - 1/4) / (3/4) = 1/3.
    calibration = ContextCalibration(alpha=0.0, beta=math.log(4))
    assert calibration.quality(0.5, 3.0) == pytest.approx(1 / 3)
    assert calibration.quality(0.0, 3.0) == pytest.approx(0.0)
    assert calibration.quality(1.0, 3.0) == pytest.approx(1.0)
    # r* = 1 + ln(1/3 + (2/3)(1/4)) / ln 4 = 1 + ln(1/2) / ln 4 = 1/2.
    retention = calibration.retention(3.0, 1 / 3)
    assert isinstance(retention, float) and retention == pytest.approx(0.5)
    ratio = calibration.compression_ratio(3.0, 1 / 3)
    assert isinstance(ratio, float) and ratio == pytest.approx(0.5)
    # b = alpha * nll + beta: 2 * 1.5 - 1 = 2.
    assert ContextCalibration(alpha=2.0, beta=-1.0).b(1.5) == pytest.approx(2.0)


def test_retention_inverts_quality():
    calibration = ContextCalibration(alpha=1.3, beta=0.4)
    r = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)[:, None]
    nll = torch.tensor([0.5, 1.0, 2.5, 4.0], dtype=torch.float64)[None, :]
    quality = calibration.quality(r, nll)
    for i in range(r.shape[0]):
        for j in range(nll.shape[1]):
            back = calibration.retention(nll[0, j], float(quality[i, j]))
            torch.testing.assert_close(back, r[i, 0], rtol=1e-9, atol=1e-9)
    # Near b = 0 the curve is linear (f = r, r* = tau) and stays finite.
    flat = ContextCalibration(alpha=0.0, beta=1e-9)
    assert flat.quality(0.3, 1.0) == pytest.approx(0.3)
    assert flat.retention(1.0, 0.9) == pytest.approx(0.9)


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5, -0.1])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        ContextCalibration(1.0, 1.0).retention(2.0, tau)


def test_fit_recovers_known_parameters():
    truth = ContextCalibration(alpha=1.5, beta=0.5)
    r, nll = torch.meshgrid(torch.linspace(0.05, 1.0, 10), torch.linspace(1.0, 4.0, 8), indexing="ij")
    fitted = fit_calibration(r.flatten(), nll.flatten(), truth.quality(r, nll).flatten())
    assert fitted.alpha == pytest.approx(1.5, abs=1e-4) and fitted.beta == pytest.approx(0.5, abs=1e-4)


def test_fit_penalises_over_predicted_quality_more():
    # Symmetric noise: the heavier under-weight pushes the curve below more of the measurements.
    truth = ContextCalibration(alpha=1.0, beta=1.0)
    r, nll = torch.meshgrid(torch.linspace(0.1, 0.9, 9), torch.tensor([1.0, 2.0, 3.0]), indexing="ij")
    noise = 0.03 * (torch.arange(r.numel()) % 2 * 2 - 1).reshape(r.shape)
    y = truth.quality(r, nll) + noise

    def over_predicted(weight):
        fitted = fit_calibration(r.flatten(), nll.flatten(), y.flatten(), under_weight=weight)
        return int((fitted.quality(r, nll) > y).sum())

    assert over_predicted(10.0) < over_predicted(1.0)
    with pytest.raises(ValueError, match="under_weight"):
        fit_calibration([0.5, 1.0], [1.0, 1.0], [0.5, 1.0], under_weight=0.0)
    with pytest.raises(ValueError, match="same length"):
        fit_calibration([0.5, 1.0], [1.0], [0.5, 1.0])


def test_save_load_round_trip(tmp_path):
    calibration = ContextCalibration(alpha=0.123456789, beta=-2.5)
    path = tmp_path / "calibration.json"
    calibration.save(path)
    assert ContextCalibration.load(path) == calibration
    path.write_text('{"format": "kvc-context-calibration", "version": 99, "alpha": 1, "beta": 1}')
    with pytest.raises(ValueError, match="version"):
        ContextCalibration.load(path)
    path.write_text('{"alpha": 1, "beta": 1}')
    with pytest.raises(ValueError, match="format"):
        ContextCalibration.load(path)


def test_context_nll_by_hand():
    # Vocabulary 3. Row 0: every logit row [ln 3, 0, 0] and targets 0, 1: p = 3/5 and 1/5 -> NLL ln(5/3), ln 5.
    # Row 1 is left-padded at position 0: only the prediction 1 -> 2 counts, target 0: ln(5/3).
    logits = torch.tensor([LN3, 0.0, 0.0]).expand(2, 3, 3)
    ids = torch.tensor([[2, 0, 1], [1, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    expected = torch.tensor([(math.log(5 / 3) + math.log(5)) / 2, math.log(5 / 3)])
    torch.testing.assert_close(context_nll(logits, ids, mask), expected)
    # Uniform logits over 7 tokens: ln 7 per prediction.
    uniform = context_nll(torch.zeros(1, 4, 7), torch.tensor([[1, 2, 3, 4]]))
    torch.testing.assert_close(uniform, torch.tensor([math.log(7)]))


def test_continuation_on_the_cache_matches_one_full_forward():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = random_prompt(2, 24)
    with torch.no_grad():
        whole = model(ids).logits
        prefill = model(ids[:, :16], **with_cache(DynamicCache()), use_cache=True)
        got = continuation_nll(model, output_cache(prefill), ids[:, 16:], 16)
    torch.testing.assert_close(got, context_nll(whole[:, 16:], ids[:, 16:]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method, options",
    [("knorm", {}), ("adacurdkv", {"num_sinks": 2}), ("compactor", {"chunk_size": 8, "sketch_size": 8})],
)
def test_measure_quality_rows(method, options):
    model = tiny_model("llama")
    ids = random_prompt(1, 40)
    rows = measure_quality(
        model, ids, 32, [1.0, 0.5], lambda r: {"method": method, "compression_ratio": 1 - r, **options}
    )
    with torch.no_grad():
        expected_nll = float(context_nll(model(ids[:, :32]).logits, ids[:, :32])[0])
    assert [row.retention for row in rows] == [1.0, 0.5]
    assert all(row.context_nll == pytest.approx(expected_nll, rel=1e-5) for row in rows)
    assert rows[0].quality == pytest.approx(1.0, abs=1e-5)  # r = 1 keeps the whole cache
    assert math.isfinite(rows[1].quality) and rows[1].quality != pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="split"):
        measure_quality(model, ids, 39, [1.0], lambda r: {"method": method, "compression_ratio": 1 - r})
