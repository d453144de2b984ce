"""KQ-SVD and its baselines: the closed form against a direct SVD of K Q^T, the paper's orderings
and invariances, the value side, rank selection, and the calibration file."""

import pytest
import torch
from conftest import tiny_model

from kvc_compile.compression.lowrank import CalibrationMismatchError, LowRankProjections
from kvc_compile.eval.lowrank import calibrate_lowrank, collect_activations, projection_quality
from kvc_compile.methods.kqsvd import (
    eigen_factors,
    kqsvd_factors,
    ksvd_factors,
    rank_for_error,
    relative_error,
    value_factors,
)


def anisotropic(rows: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d, dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64)).Q
    return torch.randn(rows, d, generator=generator, dtype=torch.float64) * scales @ mixing


def best_rank_approximation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def test_kqsvd_is_the_best_rank_r_approximation_of_kq():
    keys, queries = anisotropic(30, 8, seed=0), anisotropic(60, 8, seed=1)
    for rank in (1, 3, 8):
        down, up, spectrum = kqsvd_factors(keys, queries, rank)
        assert down.shape == up.shape == (8, rank)
        approx = (keys @ down) @ (queries @ up).T
        torch.testing.assert_close(approx, best_rank_approximation(keys @ queries.T, rank))
        # Its error is the energy of the discarded singular values of K Q^T, found without forming it.
        expected = spectrum[rank:].pow(2).sum() / spectrum.pow(2).sum()
        assert relative_error(approx, keys @ queries.T) == pytest.approx(expected.item(), abs=1e-9)
    torch.testing.assert_close(spectrum, torch.linalg.svdvals(keys @ queries.T)[:8])


def test_fewer_calibration_tokens_than_head_dim_still_give_the_best_approximation():
    keys, queries = anisotropic(5, 8, seed=2), anisotropic(10, 8, seed=3)
    down, up, _ = kqsvd_factors(keys, queries, 3)
    torch.testing.assert_close((keys @ down) @ (queries @ up).T, best_rank_approximation(keys @ queries.T, 3))


def test_kqsvd_beats_both_baselines_on_kq_and_ksvd_wins_on_keys_alone():
    keys, queries = anisotropic(40, 8, seed=4), anisotropic(80, 8, seed=5) * torch.linspace(0.2, 3, 8)
    for rank in (2, 4, 6):
        errors = {}
        for name, fit in (("kqsvd", kqsvd_factors), ("ksvd", ksvd_factors), ("eigen", eigen_factors)):
            down, up, _ = fit(keys, queries, rank)
            errors[name] = (
                relative_error((keys @ down) @ (queries @ up).T, keys @ queries.T),
                relative_error(keys @ down @ up.T, keys),
            )
        assert errors["kqsvd"][0] < errors["ksvd"][0] and errors["kqsvd"][0] < errors["eigen"][0]
        assert errors["ksvd"][1] <= errors["kqsvd"][1] and errors["ksvd"][1] <= errors["eigen"][1]


def test_rescaling_keys_against_queries_moves_only_eigen():
    keys, queries = anisotropic(40, 8, seed=6), anisotropic(80, 8, seed=7)

    def kq_error(fit, beta):
        down, up, _ = fit(keys * beta, queries / beta, 3)
        return relative_error((keys * beta @ down) @ (queries / beta @ up).T, keys @ queries.T)

    for fit in (kqsvd_factors, ksvd_factors):
        assert kq_error(fit, 10.0) == pytest.approx(kq_error(fit, 1.0), rel=1e-6)
    # Eigen decomposes [K; Q]: scaling K up makes it K-SVD (Theorem 4).
    assert kq_error(eigen_factors, 100.0) == pytest.approx(kq_error(ksvd_factors, 1.0), rel=1e-3)
    assert kq_error(eigen_factors, 100.0) != pytest.approx(kq_error(eigen_factors, 1.0), rel=1e-3)


def test_value_factors_keep_the_best_subspace_for_every_heads_output():
    values = anisotropic(30, 6, seed=8)
    blocks = torch.stack([anisotropic(6, 5, seed=9), anisotropic(6, 5, seed=10)])  # two query heads, hidden 5
    down, up, _ = value_factors(values, blocks, 2)
    rebuilt = (values @ down) @ up.T  # what the cache holds, lifted back to head_dim
    # Both heads' outputs together: the best rank-2 approximation of [V W_1, V W_2].
    joint = torch.cat([values @ blocks[0], values @ blocks[1]], dim=1)
    torch.testing.assert_close(torch.cat([rebuilt @ blocks[0], rebuilt @ blocks[1]], dim=1),
                               best_rank_approximation(joint, 2))


def test_rank_for_error_by_hand():
    # Energies 4, 1, 1 (of 6): kept fractions 4/6, 5/6, 1.
    spectra = torch.tensor([[2.0, 1.0, 1.0]])
    assert rank_for_error(spectra, 0.6) == 1  # may discard 0.36 of the energy: 2/6 <= 0.36
    assert rank_for_error(spectra, 0.5) == 2  # 0.25: 1/6 only
    assert rank_for_error(spectra, 0.0) == 3
    with pytest.raises(ValueError, match="max_error"):
        rank_for_error(spectra, 1.5)


def test_bad_ranks_are_refused():
    keys = anisotropic(10, 4, seed=11)
    for rank in (0, 5, 2.5):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, head_dim=4\]"):
            kqsvd_factors(keys, keys, rank)


def test_collected_queries_of_a_group_are_stacked_per_kv_head():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    ids = torch.arange(3, 13)[None]
    layers = collect_activations(model, [ids])
    assert len(layers) == 2
    assert layers[0].keys.shape == (2, 10, 16) and layers[0].queries.shape == (2, 20, 16)


def test_calibration_file_round_trips_and_refuses_another_model(tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 90, (1, 48), generator=torch.Generator().manual_seed(0))
    projections = calibrate_lowrank(model, [ids], method="kqsvd", max_error=0.2)
    assert all(1 <= rank <= 16 for rank in projections.key_ranks + projections.value_ranks)
    path = tmp_path / "proj.safetensors"
    projections.save(path)
    loaded = LowRankProjections.load(path, model)
    assert loaded.key_ranks == projections.key_ranks and loaded.settings == projections.settings
    for saved, read in zip(projections.key_up, loaded.key_up, strict=True):
        assert torch.equal(saved, read)
    other = tiny_model("qwen2", seed=1)  # same shapes, other weights
    with pytest.raises(CalibrationMismatchError, match="weights_sha256.*kvc-calibrate"):
        LowRankProjections.load(path, other)
    with pytest.raises(CalibrationMismatchError, match="num_hidden_layers"):
        LowRankProjections.load(path, tiny_model("qwen2", num_hidden_layers=3))
    with pytest.raises(FileNotFoundError, match="kvc-calibrate"):
        LowRankProjections.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="rank must be an integer"):
        loaded.truncated(key_rank=17)


@pytest.mark.smollm2
def test_on_real_heldout_activations_kqsvd_has_the_lowest_kq_error_at_every_rank(smollm2):
    import pydoc_data.topics

    model, tokenizer = smollm2

    def text_ids(*topics: str):
        return tokenizer("".join(pydoc_data.topics.topics[t] for t in topics), return_tensors="pt").input_ids[:, :384]

    calibration, heldout = text_ids("class", "calls"), text_ids("assignment")
    ranks = (16, 32)
    quality = {}
    for method in ("kqsvd", "ksvd", "eigen"):
        projections = calibrate_lowrank(model, [calibration], method=method, rank=64)
        quality[method] = projection_quality(model, projections, heldout, ranks)
    for index, rank in enumerate(ranks):
        kq = {method: rows[index].scores for method, rows in quality.items()}
        assert kq["kqsvd"] < kq["ksvd"] and kq["kqsvd"] < kq["eigen"], (rank, kq)
        assert 0 < kq["kqsvd"] < 0.2
