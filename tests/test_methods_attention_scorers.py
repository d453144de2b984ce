"""H2O, TOVA, ExpectedAttention and OBCache: formulas pinned on cases small enough to check by hand,
plus direct checks of what the scores claim to measure (Monte Carlo, finite perturbations)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvc_compile.compression.prefill import compress_layer
from kvc_compile.methods import h2o as h2o_module
from kvc_compile.methods.base import PROTECTED, ScoreInputs
from kvc_compile.methods.expected_attention import ExpectedAttention
from kvc_compile.methods.h2o import H2O
from kvc_compile.methods.obcache import OBCache
from kvc_compile.methods.rotary import rotate_half
from kvc_compile.methods.tova import TOVA

LN3 = math.log(3)


def tensor(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def inputs(keys, queries=None, values=None, valid=None, cos=None, sin=None) -> ScoreInputs:
    keys = tensor(keys)
    queries = keys.new_ones(keys.shape) if queries is None else tensor(queries)
    values = keys if values is None else tensor(values)
    valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool) if valid is None else valid
    return ScoreInputs(queries, keys, values, valid, 0, 1, cos, sin)


def identity_rotary(batch: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(batch, 1, n, d), torch.zeros(batch, 1, n, d)


def rope_tables(positions: torch.Tensor, theta: torch.Tensor, scale: float = 1.0):
    """transformers-style tables [batch, 1, n, d] for positions [batch, n] and frequencies theta [d/2]."""
    angles = positions[..., None].double() * theta.double()
    angles = torch.cat([angles, angles], dim=-1)
    return (scale * angles.cos()).float()[:, None], (scale * angles.sin()).float()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def causal_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Full [.., n, n] causal softmax, float64, for direct comparisons."""
    n, d = queries.shape[-2], queries.shape[-1]
    logits = queries.double() @ keys.double().transpose(-1, -2) / math.sqrt(d)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)


# --------------------------------------------------------------------------------------------------- H2O

# One head, head_dim 1, queries 1 -> logit of key j is k_j. keys [0, ln 3, 0]:
# query 0 sees [1] -> A = [1]; query 1 sees exp-weights [1, 3] -> [1/4, 3/4]; query 2 [1, 3, 1] -> [1/5, 3/5, 1/5].
# Column sums: j=0 1 + 1/4 + 1/5 = 29/20, j=1 3/4 + 3/5 = 27/20, j=2 1/5; seen by 3, 2, 1 queries:
# s = [29/60, 27/40, 1/5].
H2O_KEYS = [[[[0.0], [LN3], [0.0]]]]
H2O_EXPECTED = [29 / 60, 27 / 40, 1 / 5]


def test_h2o_normalised_accumulated_attention():
    scores = H2O().score(inputs(H2O_KEYS))
    torch.testing.assert_close(scores[0, 0], tensor(H2O_EXPECTED))


@pytest.mark.parametrize("chunk", [1, 2])
def test_h2o_chunking_does_not_change_scores(monkeypatch, chunk):
    monkeypatch.setattr(h2o_module, "QUERY_CHUNK", chunk)
    torch.testing.assert_close(H2O().score(inputs(H2O_KEYS))[0, 0], tensor(H2O_EXPECTED))


def test_h2o_matches_the_full_attention_matrix_across_chunks():
    # 300 > QUERY_CHUNK: several chunks, the last one partial.
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2, 4, 300, 8, generator=g), torch.randn(2, 2, 300, 8, generator=g)
    attention = causal_attention(queries, keys.repeat_interleave(2, dim=1))  # [2, 4, n, n]
    per_head = attention.sum(dim=2) / torch.arange(300, 0, -1, dtype=torch.float64)
    expected = per_head.view(2, 2, 2, 300).mean(dim=2).float()
    torch.testing.assert_close(H2O().score(inputs(keys, queries)), expected, rtol=1e-4, atol=1e-6)


def test_h2o_averages_over_the_gqa_group():
    # Second query head has zero queries: uniform attention. Query 0: [1], 1: [1/2, 1/2], 2: [1/3, 1/3, 1/3];
    # column sums [11/6, 5/6, 1/3] over [3, 2, 1] queries = [11/18, 5/12, 1/3].
    queries = torch.cat([torch.ones(1, 1, 3, 1), torch.zeros(1, 1, 3, 1)], dim=1)
    scores = H2O().score(inputs(H2O_KEYS, queries))
    expected = (tensor(H2O_EXPECTED) + tensor([11 / 18, 5 / 12, 1 / 3])) / 2
    torch.testing.assert_close(scores[0, 0], expected)


def test_h2o_padding_queries_do_not_vote_nor_count():
    # Two padding slots (wild keys and queries) in front of the hand case: real scores unchanged.
    keys = [[[[9.0], [-4.0], [0.0], [LN3], [0.0]]]]
    queries = [[[[7.0], [3.0], [1.0], [1.0], [1.0]]]]
    valid = torch.tensor([[False, False, True, True, True]])
    scores = H2O().score(inputs(keys, queries, valid=valid))
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[0, 0, 2:], tensor(H2O_EXPECTED))


# -------------------------------------------------------------------------------------------------- TOVA


def test_tova_last_query_attention_averaged_over_all_query_heads():
    # 4 query heads over 2 KV heads, head_dim 1. KV head 0 keys [0, ln 3, 0], KV head 1 keys [0, 0, ln 3];
    # query heads 0 and 2 have q = 1, heads 1 and 3 q = 0 (uniform). Last-token attention:
    # head 0 [1, 3, 1]/5, head 1 [1, 1, 1]/3, head 2 [1, 1, 3]/5, head 3 [1, 1, 1]/3.
    # j=0: (1/5 + 1/3 + 1/5 + 1/3)/4 = 4/15; j=1: (3/5 + 1/3 + 1/5 + 1/3)/4 = 11/30; j=2 kept.
    keys = [[[[0.0], [LN3], [0.0]], [[0.0], [0.0], [LN3]]]]
    queries = torch.tensor([1.0, 0.0, 1.0, 0.0])[None, :, None, None].expand(1, 4, 3, 1)
    scores = TOVA().score(inputs(keys, queries))
    expected = tensor([4 / 15, 11 / 30, PROTECTED])
    torch.testing.assert_close(scores[0, 0], expected)
    torch.testing.assert_close(scores[0, 1], expected)  # one decision for the whole layer


def test_tova_ignores_padding_keys():
    keys = [[[[9.0], [0.0], [LN3], [0.0]]]]
    valid = torch.tensor([[False, True, True, True]])
    scores = TOVA().score(inputs(keys, valid=valid))
    torch.testing.assert_close(scores[0, 0, 1:], tensor([1 / 5, 3 / 5, PROTECTED]))
    assert scores[0, 0, 0] == 0


# ------------------------------------------------------------------------------------- ExpectedAttention


def expected(keys, queries, values=None, valid=None, cos=None, sin=None, **options) -> torch.Tensor:
    keys = tensor(keys)
    if cos is None:
        cos, sin = identity_rotary(keys.shape[0], keys.shape[2], keys.shape[3])
    options = {"n_sink": 0, "use_vnorm": False, **options}
    return ExpectedAttention(**options).score(inputs(keys, queries, values, valid, cos, sin))


S2 = math.sqrt(2)


def test_expected_attention_mean_term():
    # d = 2, identity rotary, every query [sqrt 2, 0]: mu = [sqrt 2, 0], Sigma = 0, logit = mu.k/sqrt 2 = k_x.
    # keys x-components [0, ln 3, 0] -> softmax [1, 3, 1]/5.
    keys = [[[[0.0, 0.0], [LN3, 7.0], [0.0, -1.0]]]]
    queries = tensor([S2, 0.0]).expand(1, 1, 3, 2)
    for use_covariance in (True, False):
        scores = expected(keys, queries, use_covariance=use_covariance)
        torch.testing.assert_close(scores[0, 0], tensor([1 / 5, 3 / 5, 1 / 5]))


def test_expected_attention_covariance_term():
    # Queries alternate [sqrt 2 + 1, 0] and [sqrt 2 - 1, 0]: mu = [sqrt 2, 0], population Sigma = diag(1, 0).
    # Exponent k_x + k_x^2 / (2 d) = k_x + k_x^2 / 4: keys [0, 0] -> 0, [2, 0] -> 3, [-2, 0] -> -1, [0, 5] -> 0.
    keys = [[[[0.0, 0.0], [2.0, 0.0], [-2.0, 0.0], [0.0, 5.0]]]]
    queries = tensor([[S2 + 1, 0.0], [S2 - 1, 0.0]] * 2)[None, None]
    weights = tensor([1.0, math.e**3, math.e**-1, 1.0])
    torch.testing.assert_close(expected(keys, queries)[0, 0], weights / weights.sum())
    # Without the covariance only the mean term k_x is left: [1, e^2, e^-2, 1].
    weights = tensor([1.0, math.e**2, math.e**-2, 1.0])
    torch.testing.assert_close(expected(keys, queries, use_covariance=False)[0, 0], weights / weights.sum())


def test_expected_attention_matches_monte_carlo():
    """softmax of mu.k/sqrt d + k^T Sigma k / 2d equals E[exp(q.k/sqrt d)] normalised, q ~ N(mu, Sigma)."""
    g = torch.Generator().manual_seed(0)
    queries = (torch.randn(40, 2, generator=g) @ tensor([[0.6, 0.2], [0.0, 0.4]]) + tensor([0.5, -0.3])).double()
    keys = torch.randn(1, 1, 40, 2, generator=g)
    mu, sigma = queries.mean(dim=0), torch.cov(queries.T, correction=0)
    samples = torch.distributions.MultivariateNormal(mu, sigma).sample((400_000,))
    moment = (samples @ keys[0, 0].double().T / S2).exp().mean(dim=0)
    scores = expected(keys, queries[None, None].float())
    torch.testing.assert_close(scores[0, 0].double(), moment / moment.sum(), rtol=1e-2, atol=1e-4)


def test_expected_attention_sinks_are_kept_and_left_out():
    # A wild sink token in front of the mean-term case: its query does not enter the statistics, its key is
    # not in the softmax and it is always kept.
    keys = [[[[50.0, 0.0], [0.0, 0.0], [LN3, 7.0], [0.0, -1.0]]]]
    queries = tensor([[100.0, -30.0]] + [[S2, 0.0]] * 3)[None, None]
    scores = expected(keys, queries, n_sink=1)
    torch.testing.assert_close(scores[0, 0], tensor([PROTECTED, 1 / 5, 3 / 5, 1 / 5]))


def test_expected_attention_value_norm_and_epsilon():
    # (s + epsilon) * ||v||: s = [1/5, 3/5, 1/5], ||v|| = [5, 1, 2], epsilon 0.1 -> [1.5, 0.7, 0.6].
    keys = [[[[0.0, 0.0], [LN3, 7.0], [0.0, -1.0]]]]
    values = [[[[3.0, 4.0], [0.0, 1.0], [2.0, 0.0]]]]
    queries = tensor([S2, 0.0]).expand(1, 1, 3, 2)
    scores = expected(keys, queries, values, use_vnorm=True, epsilon=0.1)
    torch.testing.assert_close(scores[0, 0], tensor([1.5, 0.7, 0.6]))


# d = 2, one frequency theta = pi/2, positions 0, 1, 2, pre-RoPE queries all [1, 0] (mu = 1 as a complex number).
QUARTER_TURN = torch.tensor([math.pi / 2])


def rotated_case(n_future, keys, scale=1.0, key_scale=1.0):
    positions = torch.arange(3)[None]
    cos, sin = rope_tables(positions, QUARTER_TURN, scale)
    queries = apply_rope(tensor([1.0, 0.0]).expand(1, 1, 3, 2), cos, sin)
    return expected(tensor(keys) * key_scale, queries, cos=cos, sin=sin, n_future_positions=n_future)


def test_expected_attention_rotates_the_mean_to_the_next_position():
    # n_future 1: the next position is 3, rotation e^{3i pi/2} = -i, so mu' = [0, -1] and
    # logits mu'.k/sqrt 2: keys [0, 0], [0, -sqrt 2 ln 3], [5, 0] -> [0, ln 3, 0] -> [1/5, 3/5, 1/5].
    keys = [[[[0.0, 0.0], [0.0, -S2 * LN3], [5.0, 0.0]]]]
    torch.testing.assert_close(rotated_case(1, keys)[0, 0], tensor([1 / 5, 3 / 5, 1 / 5]))


def test_expected_attention_averages_the_future_rotations():
    # n_future 2: positions 3 and 4, (e^{3i pi/2} + e^{4i pi/2}) / 2 = (1 - i)/2, mu' = [1/2, -1/2];
    # keys [0, 0], [sqrt 2 ln 3, -sqrt 2 ln 3], [sqrt 2, sqrt 2] -> logits [0, ln 3, 0].
    keys = [[[[0.0, 0.0], [S2 * LN3, -S2 * LN3], [S2, S2]]]]
    torch.testing.assert_close(rotated_case(2, keys)[0, 0], tensor([1 / 5, 3 / 5, 1 / 5]))
    # n_future 4 covers a full turn: mean rotation 0, every logit 0, uniform scores.
    torch.testing.assert_close(rotated_case(4, keys)[0, 0], torch.full((3,), 1 / 3))


def test_expected_attention_attention_scaling_is_applied_once():
    # Tables scaled by m = 2 (YaRN-like): queries are 2 R q_pre, a future query is 2 R' q_pre, so the logits
    # double, the same as m = 1 with keys twice as large.
    keys = [[[[0.0, 0.0], [S2 * LN3, -S2 * LN3], [S2, S2]]]]
    torch.testing.assert_close(rotated_case(2, keys, scale=2.0), rotated_case(2, keys, key_scale=2.0))


def test_expected_attention_general_rotation_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    d, n, n_future = 4, 7, 5
    theta = tensor([0.7, 0.05])
    cos, sin = rope_tables(torch.arange(n)[None], theta)
    pre = torch.randn(1, 2, n, d, generator=g)
    keys = torch.randn(1, 1, n, d, generator=g)
    scores = expected(keys, apply_rope(pre, cos, sin), cos=cos, sin=sin, n_future_positions=n_future)
    # Closed form in complex pairs: (x_i + 1j x_{i+d/2}) is multiplied by the mean of e^{i p theta}, p = n..n+T-1.
    future = torch.arange(n, n + n_future, dtype=torch.float64)[:, None] * theta.double()
    factor = torch.polar(torch.ones_like(future), future).mean(dim=0)
    mean_rot = torch.cat([factor.real, factor.real]) * torch.eye(d, dtype=torch.float64)
    mean_rot = mean_rot + torch.cat([factor.imag, factor.imag]) * rotate_half(torch.eye(d, dtype=torch.float64))
    mean_rot = mean_rot.T  # columns: R e_c
    per_head = []
    for h in range(2):
        q = pre[0, h].double()
        mu, sigma = mean_rot @ q.mean(dim=0), mean_rot @ torch.cov(q.T, correction=0) @ mean_rot.T
        k = keys[0, 0].double()
        logits = k @ mu / math.sqrt(d) + ((k @ sigma) * k).sum(dim=-1) / (2 * d)
        per_head.append(logits.softmax(dim=-1))
    torch.testing.assert_close(scores[0, 0].double(), (per_head[0] + per_head[1]) / 2, rtol=1e-4, atol=1e-6)


def test_expected_attention_left_padding_uses_per_row_positions():
    # The same prompt alone and behind two wild padding slots, positions counted from the first real token
    # (padding at 0, as the reference prefill does): the real tokens score the same.
    g = torch.Generator().manual_seed(2)
    d, n_real, pad, theta = 4, 6, 2, tensor([0.9, 0.1])
    pre_q, pre_k, values = (torch.randn(1, heads, n_real, d, generator=g) for heads in (2, 1, 1))

    def score(x_q, x_k, v, valid):
        positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        cos, sin = rope_tables(positions, theta)
        case = ScoreInputs(apply_rope(x_q, cos, sin), apply_rope(x_k, cos, sin), v, valid, 0, 1, cos, sin)
        return ExpectedAttention(n_sink=1).score(case)

    def padded(x):
        return torch.cat([torch.full((1, x.shape[1], pad, d), 50.0), x], dim=2)

    alone = score(pre_q, pre_k, values, torch.ones(1, n_real, dtype=torch.bool))
    behind = score(padded(pre_q), padded(pre_k), padded(values), torch.arange(n_real + pad)[None] >= pad)
    assert not torch.isnan(behind).any()
    torch.testing.assert_close(behind[..., pad:], alone)
    assert torch.isinf(behind[0, 0, pad])  # the sink is the first real token
    # In a batch beside a full row (last position 7, not 5): each row rotates from its own last position.
    full_q, full_k, full_v = (torch.randn(1, heads, n_real + pad, d, generator=g) for heads in (2, 1, 1))
    batch = score(
        torch.cat([full_q, padded(pre_q)]),
        torch.cat([full_k, padded(pre_k)]),
        torch.cat([full_v, padded(values)]),
        torch.arange(n_real + pad)[None] >= torch.tensor([[0], [pad]]),
    )
    torch.testing.assert_close(batch[1:, :, pad:], alone)


def test_expected_attention_short_rows_stay_finite():
    # A row with a single real token (only a sink) and a row with one token past the sink.
    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]])
    valid = torch.tensor([[False, False, False, True], [False, False, True, True]])
    cos, sin = rope_tables(positions, tensor([0.5]))
    queries, keys = torch.randn(2, 2, 4, 2, generator=g), torch.randn(2, 1, 4, 2, generator=g)
    scores = ExpectedAttention(n_sink=1).score(ScoreInputs(queries, keys, keys, valid, 0, 1, cos, sin))
    assert not torch.isnan(scores).any()
    assert torch.isinf(scores[0, 0, 3]) and torch.isinf(scores[1, 0, 2]) and torch.isfinite(scores[1, 0, 3])


def test_expected_attention_needs_rotary_tables():
    assert ExpectedAttention.needs_rotary
    with pytest.raises(ValueError, match="pre-RoPE"):
        ExpectedAttention().score(inputs(torch.randn(1, 1, 6, 2)))


# ------------------------------------------------------------------------------------------------ OBCache


def test_obcache_hand_case_tova_base():
    # One head, head_dim 1, P = the last query (tova base). z = keys = [0, ln 3, 0], A = [1/5, 3/5, 1/5],
    # values [3, 1, 1]: o = 3/5 + 3/5 + 1/5 = 7/5.
    # j=0: S^V = (1/5)^2 * 9 = 9/25, z = 0 so S^K = 0 and no cross term.
    # j=1: S^V = (3/5)^2 * 1 = 9/25; S^K = (3/5 ln 3)^2 (1 - 7/5)^2 = 36 ln^2 3 / 625;
    #      cross = 2 (3/5)^2 ln 3 (1 - 7/5) = -36 ln 3 / 125.
    case = inputs([[[[0.0], [LN3], [0.0]]]], values=[[[[3.0], [1.0], [1.0]]]])
    expected_scores = {
        "v": [9 / 25, 9 / 25],
        "k": [0.0, 36 * LN3**2 / 625],
        "kv": [9 / 25, 9 / 25 + 36 * LN3**2 / 625 - 36 * LN3 / 125],
    }
    for variant, values in expected_scores.items():
        scores = OBCache(variant=variant, base="tova").score(case)
        torch.testing.assert_close(scores[0, 0], tensor([*values, PROTECTED]))


def perturbed_output_change(queries, keys, values, window, j, key_factor, value_factor) -> float:
    """sum over the last ``window`` queries of ||o_i' - o_i||^2 with k_j, v_j scaled, float64."""

    def outputs(k, v):
        return (causal_attention(queries, k) @ v.double())[..., -window:, :]

    k2, v2 = keys.clone().double(), values.clone().double()
    k2[..., j, :] *= key_factor
    v2[..., j, :] *= value_factor
    return (outputs(k2, v2) - outputs(keys, values)).square().sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obcache_scores_match_perturbations_of_the_output(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, window, eps = 7, 3, 3, 1e-3
    queries, keys, values = (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    case = inputs(keys, queries, values)
    score = {v: OBCache(variant=v, base="h2o", window_size=window).score(case)[0, 0].double() for v in ("v", "k", "kv")}
    for j in range(n - window):
        # Value pruning is exact: o_i changes by -A_ij v_j.
        measured = perturbed_output_change(queries, keys, values, window, j, 1.0, 0.0)
        assert score["v"][j].item() == pytest.approx(measured, rel=1e-4)
        # Key and joint scores are second-order saliencies: shrinking by (1 - eps) changes the output by eps^2 * S.
        measured = perturbed_output_change(queries, keys, values, window, j, 1 - eps, 1.0)
        assert eps**2 * score["k"][j].item() == pytest.approx(measured, rel=1e-2)
        measured = perturbed_output_change(queries, keys, values, window, j, 1 - eps, 1 - eps)
        assert eps**2 * score["kv"][j].item() == pytest.approx(measured, rel=1e-2)
    assert torch.isinf(score["kv"][n - window :]).all()  # the window is kept


def test_obcache_snapkv_base_pools_the_h2o_scores():
    g = torch.Generator().manual_seed(4)
    queries, keys, values = (torch.randn(1, 1, 12, 4, generator=g) for _ in range(3))
    case = inputs(keys, queries, values)
    raw = OBCache(base="h2o", window_size=4).score(case)[..., :8]
    for pooling, pool in (("max", F.max_pool1d), ("avg", F.avg_pool1d)):
        pooled = OBCache(base="snapkv", window_size=4, kernel_size=3, pooling=pooling).score(case)
        torch.testing.assert_close(pooled[..., :8], pool(raw, 3, stride=1, padding=1))
        assert torch.isinf(pooled[..., 8:]).all()


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_obcache_gqa_aggregation(gqa):
    g = torch.Generator().manual_seed(5)
    queries, keys, values = (torch.randn(1, heads, 10, 4, generator=g) for heads in (2, 1, 1))
    method = OBCache(base="h2o", window_size=3, gqa=gqa)
    heads = [method.score(inputs(keys, queries[:, h : h + 1], values)) for h in range(2)]
    combined = (heads[0] + heads[1]) / 2 if gqa == "mean" else torch.maximum(heads[0], heads[1])
    torch.testing.assert_close(method.score(inputs(keys, queries, values)), combined)


def test_obcache_window_and_minimum_length():
    assert OBCache(window_size=16).min_uncompressed_length == 16
    assert OBCache(base="h2o", window_size=16).min_uncompressed_length == 16
    assert OBCache(base="tova").min_uncompressed_length == 0
    scores = OBCache(base="tova", window_size=16).score(inputs(torch.randn(1, 1, 6, 2)))
    assert torch.isfinite(scores[0, 0, :5]).all() and torch.isinf(scores[0, 0, 5])


def test_obcache_padding():
    g = torch.Generator().manual_seed(6)
    queries, keys, values = (torch.randn(1, 1, 8, 2, generator=g) for _ in range(3))
    unpadded = OBCache(window_size=3, kernel_size=1).score(inputs(keys, queries, values))
    # Two wild padding slots in front: the real tokens score as before.
    pad = torch.full((1, 1, 2, 2), 40.0)
    keys, queries, values = (torch.cat([pad, x], dim=2) for x in (keys, queries, values))
    valid = torch.tensor([[False, False] + [True] * 8])
    padded = OBCache(window_size=3, kernel_size=1).score(inputs(keys, queries, values, valid))
    torch.testing.assert_close(padded[..., 2:], unpadded)
    # A row shorter than the window (padding queries inside it) stays finite for every base.
    valid = torch.tensor([[False] * 8 + [True] * 2])
    for base in ("snapkv", "h2o", "tova"):
        assert not torch.isnan(OBCache(base=base, window_size=3).score(inputs(keys, queries, values, valid))).any()


# ------------------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize(
    "method",
    [H2O(), TOVA(), ExpectedAttention(), OBCache(window_size=4), OBCache(base="tova", variant="v", gqa="max")],
    ids=lambda m: f"{m.name}",
)
def test_methods_compress_a_padded_gqa_batch(method):
    g = torch.Generator().manual_seed(7)
    batch, n, d = 2, 20, 8
    queries, keys, values = (torch.randn(batch, heads, n, d, generator=g) for heads in (4, 2, 2))
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :5] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope_tables(positions, 1 / 10000 ** (torch.arange(0, d, 2) / d))
    case = ScoreInputs(queries, keys, values, valid, 0, 1, cos, sin)
    scores = method.score(case)
    assert scores.shape == (batch, 2, n) and scores.dtype == torch.float32
    assert not torch.isnan(scores).any() and not torch.isnan(scores[valid[:, None].expand_as(scores)]).any()
    assert torch.equal(scores, method.score(case))  # deterministic
    kept = compress_layer(method, 8, case)
    assert kept.keys.shape == (batch, 2, 8, d)
    assert (kept.positions[1] >= 5).all()  # enough real tokens: no padding kept
    protected = torch.isinf(scores) & (scores > 0)
    for b in range(batch):
        for h in range(2):
            assert set(protected[b, h].nonzero().flatten().tolist()) <= set(kept.positions[b, h].tolist())


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (ExpectedAttention, {"n_future_positions": 0}, "n_future_positions"),
        (ExpectedAttention, {"n_sink": -1}, "n_sink"),
        (ExpectedAttention, {"epsilon": -0.5}, "epsilon"),
        (ExpectedAttention, {"epsilon": float("nan")}, "epsilon"),
        (OBCache, {"variant": "q"}, "variant 'q'; valid choices: v, k, kv"),
        (OBCache, {"base": "snap"}, "base 'snap'; valid choices: h2o, snapkv, tova"),
        (OBCache, {"pooling": "median"}, "pooling 'median'; valid choices: avg, max"),
        (OBCache, {"gqa": "sum"}, "gqa 'sum'; valid choices: mean, max"),
        (OBCache, {"window_size": 0}, "window_size"),
        (OBCache, {"kernel_size": 4}, "kernel_size"),
    ],
)
def test_option_validation(cls, options, message):
    with pytest.raises(ValueError, match=message) as error:
        cls(**options)
    assert cls.name in str(error.value)
    assert repr(next(iter(options.values()))).strip("'") in str(error.value)
