"""Triton kernels against their pure-PyTorch references, over shapes drawn by hypothesis.

Without a GPU they run under ``TRITON_INTERPRET=1`` (set in conftest) on CPU tensors; with one,
compiled, on CUDA tensors (``DEVICE``), plus the ``gpu``-marked tests at the end at long-context
shapes the interpreter is too slow for. Inputs in fp16/bf16 are loaded by the kernels and the
references alike and computed in fp32, so results differ only by fp32 summation order; the
tolerances below are per input dtype.
"""


import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kvc_compile.methods.scoring import window_votes
from kvc_compile.plugins.triton import TRITON_AVAILABLE

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}  # absolute, on probabilities
DTYPES = st.sampled_from(list(TOLERANCE))
# Fixed examples (the same in every run) and no shrinking: the interpreter makes each example slow.
KERNEL_SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


def pure_torch_selection():
    """Scoring and selection through PyTorch alone, as outside any op (a GPU reference must not
    call the kernels an op hands in)."""
    from kvc_compile.methods.kernels import REFERENCE, using_kernels

    return using_kernels(REFERENCE)


@st.composite
def attention_case(draw):
    """Queries, keys and a left-padded validity mask: GQA groups 1-8, head dims 64/128, any length."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    head_dim = draw(st.sampled_from([64, 128]))
    n = draw(st.integers(1, 150))  # mostly not a multiple of the 64-key block
    dtype = draw(DTYPES)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    queries = torch.randn(batch, kv_heads * group, n, head_dim, generator=generator).to(dtype)
    keys = (2 * torch.randn(batch, kv_heads, n, head_dim, generator=generator)).to(dtype)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[-1, : draw(st.integers(0, n - 1))] = False  # left padding of the last row
    return queries.to(DEVICE), keys.to(DEVICE), valid.to(DEVICE)


@KERNEL_SETTINGS
@given(case=attention_case(), window=st.integers(1, 40))
def test_fused_window_votes_match_the_reference(case, window):
    from kvc_compile.plugins.triton.window_scores import window_votes_triton

    queries, keys, valid = case
    expected = window_votes(queries, keys, valid, window)  # window > n: every query votes
    got = window_votes_triton(queries, keys, valid, window)
    torch.testing.assert_close(got, expected, atol=TOLERANCE[queries.dtype], rtol=1e-4)


@KERNEL_SETTINGS
@given(case=attention_case(), window=st.integers(1, 40), variant=st.sampled_from(["v", "k", "kv"]))
def test_fused_obcache_saliency_matches_the_reference(case, window, variant):
    from kvc_compile.methods.scoring import window_output_saliency
    from kvc_compile.plugins.triton.window_scores import output_saliency_triton

    queries, keys, valid = case
    values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(7)).to(keys)
    expected = window_output_saliency(queries, keys, values, valid, window, variant)
    got = output_saliency_triton(queries, keys, values, valid, window, variant)
    # Saliencies scale with ||v||^2 and z^2: compare relative to the largest one. Both sides expand
    # ||v_j - o_i||^2, so where a saliency cancels to ~0 (a lone real key: o_i = v_j) fp32 rounding
    # is relative to ||v||^2 instead.
    scale = max(float(expected.abs().max()), float(values.float().square().sum(-1).max()))
    torch.testing.assert_close(got, expected, atol=1e-5 * scale + 1e-6, rtol=1e-4)


def test_window_votes_op_runs_the_reference_on_the_cpu():
    import kvc_compile.ops.kernels  # noqa: F401  (registers kvc::window_votes)

    queries, keys = torch.randn(1, 4, 20, 64), torch.randn(1, 2, 20, 64)
    valid = torch.ones(1, 20, dtype=torch.bool)
    got = torch.ops.kvc.window_votes(queries, keys, valid, 8)
    assert torch.equal(got, window_votes(queries, keys, valid, 8))
    # Every voter's row sums to 1 over the keys: 8 window queries per head.
    torch.testing.assert_close(got.sum(-1), torch.full((1, 4), 8.0))


@st.composite
def selection_case(draw):
    """Scores with a protected window (+inf), left padding (-inf), ties, and entries to gather."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    n = draw(st.integers(1, 700))  # one to several 256-entry blocks, rarely a multiple of them
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scores = torch.randn(batch, heads, n, generator=generator)
    scores[..., n - draw(st.integers(0, min(n, 32))) :] = float("inf")
    scores[-1, :, : draw(st.integers(0, n))] = float("-inf")
    if draw(st.booleans()):  # coarse values: many ties at the threshold, and -0.0 next to 0.0
        scores = (scores * 2).round()
    dtype = draw(DTYPES)
    keys = torch.randn(batch, heads, n, draw(st.sampled_from([64, 128])), generator=generator).to(dtype)
    values = torch.randn(batch, heads, n, 64, generator=generator).to(dtype)
    k = draw(st.integers(1, n))
    return scores.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), k


@KERNEL_SETTINGS
@given(case=selection_case())
def test_selection_and_compaction_match_the_reference(case):
    from kvc_compile.compression.layout import gather_kept
    from kvc_compile.plugins.triton.compaction import (
        select_and_gather_triton,
        stable_select_reference,
        top_positions_triton,
    )

    scores, keys, values, k = case
    kept_keys, kept_values, positions = select_and_gather_triton(scores, keys, values, k)
    expected = stable_select_reference(scores, k)
    assert torch.equal(positions.long(), expected)
    assert torch.equal(kept_keys, gather_kept(keys, expected))
    assert torch.equal(kept_values, gather_kept(values, expected))
    assert torch.equal(top_positions_triton(scores, k), expected)  # the selection alone


def test_stable_reference_keeps_what_select_uniform_keeps_without_ties():
    from kvc_compile.methods.selection import select_uniform
    from kvc_compile.plugins.triton.compaction import stable_select_reference

    scores = torch.randn(2, 3, 50)
    valid = torch.ones(2, 50, dtype=torch.bool)
    assert torch.equal(stable_select_reference(scores, 20), select_uniform(scores, valid, 20))
    # Ties go to the lowest positions.
    assert stable_select_reference(torch.tensor([[[1.0, 2.0, 1.0, 1.0]]]), 2).tolist() == [[[0, 1]]]


def test_head_adaptive_selection_through_the_radix_select():
    """AdaKV's floor + global top-k: the kernel on the boosted, flattened scores keeps what torch keeps."""
    from kvc_compile.methods import selection
    from kvc_compile.methods.kernels import Kernels, using_kernels
    from kvc_compile.plugins.triton.compaction import top_positions_triton

    torch.manual_seed(3)
    scores = torch.randn(2, 4, 75).to(DEVICE)
    scores[..., -8:] = float("inf")
    valid = torch.ones(2, 75, dtype=torch.bool, device=DEVICE)
    valid[1, :20] = False
    with pure_torch_selection():
        expected = selection.select_head_adaptive(scores, valid, 30, 0.2)
        expected_uniform = selection.select_uniform(scores, valid, 30)
    with using_kernels(Kernels(top_positions=top_positions_triton)):  # what an op hands in for GPU tensors
        assert torch.equal(selection.select_head_adaptive(scores, valid, 30, 0.2), expected)
        assert torch.equal(selection.select_uniform(scores, valid, 30), expected_uniform)


def test_negative_zero_ties_with_zero():
    from kvc_compile.plugins.triton.compaction import select_and_gather_triton

    scores = torch.tensor([[[-0.0, 1.0, 0.0, -1.0, 0.0]]], device=DEVICE)
    entries = torch.randn(1, 1, 5, 16, device=DEVICE)
    _, _, positions = select_and_gather_triton(scores, entries, entries, 3)
    assert positions.tolist() == [[[0, 1, 2]]]  # -0.0 and 0.0 are one value: the lowest positions win


def test_head_adaptive_selection_is_one_row_over_the_layer():
    """AdaKV's global top-k: the layer's heads flattened into one row, positions ``head * n + t``."""
    from kvc_compile.plugins.triton.compaction import select_and_gather_triton

    scores = torch.tensor([[[5.0, 1.0, 0.0], [4.0, 3.0, 2.0]]], device=DEVICE)  # head 0 concentrated, head 1 spread
    keys = torch.arange(6.0, device=DEVICE).view(1, 2, 3, 1).expand(1, 2, 3, 16).contiguous()
    flat_keys, _, flat = select_and_gather_triton(scores.view(1, 1, 6), keys.view(1, 1, 6, 16),
                                                  keys.view(1, 1, 6, 16), 3)
    assert flat.tolist() == [[[0, 3, 4]]] and flat_keys[0, 0, :, 0].tolist() == [0.0, 3.0, 4.0]


@pytest.mark.parametrize("method", ["snapkv", "tova", "lava", "obcache"])
def test_scorers_keep_the_same_entries_through_the_kernels(method):
    """What the GPU path runs (the kernels an op hands in) keeps what the reference keeps."""
    from kvc_compile.compression.prefill import compress_layer
    from kvc_compile.methods import build_method
    from kvc_compile.methods.base import ScoreInputs
    from kvc_compile.methods.kernels import Kernels, using_kernels
    from kvc_compile.plugins.triton.compaction import select_and_gather_triton
    from kvc_compile.plugins.triton.window_scores import output_saliency_triton, window_votes_triton

    torch.manual_seed(0)
    queries, keys, values = torch.randn(2, 8, 90, 64), torch.randn(2, 2, 90, 64), torch.randn(2, 2, 90, 64)
    queries, keys, values = queries.to(DEVICE), keys.to(DEVICE), values.to(DEVICE)
    valid = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    valid[1, :13] = False
    scorer = build_method(method, {} if method == "tova" else {"window_size": 16})
    with pure_torch_selection():
        reference = compress_layer(scorer, 40, ScoreInputs(queries, keys, values, valid, 0))
    kernels = Kernels(window_votes=window_votes_triton, select_and_gather=select_and_gather_triton,
                      output_saliency=output_saliency_triton)
    with using_kernels(kernels):
        fused = compress_layer(scorer, 40, ScoreInputs(queries, keys, values, valid, 0))
    assert torch.equal(fused.positions, reference.positions) and torch.equal(fused.heads, reference.heads)
    torch.testing.assert_close(fused.keys, reference.keys)


@st.composite
def packed_case(draw):
    """A packed run: entries labelled by KV head (-1: padding), the new tokens' entries last."""
    batch, kv_heads = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    group, head_dim = draw(st.sampled_from([1, 2, 3, 4, 8])), draw(st.sampled_from([64, 128]))
    q_len, kept = draw(st.integers(1, 3)), draw(st.integers(0, 600))
    total = kept + q_len * kv_heads
    dtype = draw(DTYPES)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    query = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=generator).to(dtype)
    keys = torch.randn(batch, 1, total, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, 1, total, head_dim, generator=generator).to(dtype)
    heads = torch.randint(-1, kv_heads, (batch, 1, total), generator=generator, dtype=torch.int32)
    heads[..., kept:] = torch.arange(kv_heads, dtype=torch.int32).repeat(q_len)  # token-major new entries
    return tuple(x.to(DEVICE) for x in (query, keys, values, heads)) + (kv_heads,)


@KERNEL_SETTINGS
@given(case=packed_case(), chunk=st.sampled_from([64, 256]))
def test_packed_decode_attention_matches_the_reference(case, chunk):
    from kvc_compile.compression.attention import packed_attention_reference
    from kvc_compile.plugins.triton.decode_attention import packed_attention_triton

    query, keys, values, heads, kv_heads = case
    scaling = query.shape[-1] ** -0.5
    expected = packed_attention_reference(query, keys, values, heads, kv_heads, scaling)
    got = packed_attention_triton(query, keys, values, heads, kv_heads, scaling, chunk=chunk)
    # Outputs are cast back to the query's dtype: one rounding of that dtype apart at most.
    tolerance = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[query.dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@KERNEL_SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 40), st.sampled_from([64, 128]),
                    st.integers(1, 64)),
    dtype=DTYPES, seed=st.integers(0, 2**16),
)
def test_fused_rope_and_lowrank_projection_match_the_reference(shape, dtype, seed):
    from kvc_compile.plugins.triton.lowrank import rope_lowrank_project_reference, rope_lowrank_project_triton

    batch, kv_heads, q_len, head_dim, rank = shape
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, q_len, head_dim, generator=generator).to(dtype)
    angles = torch.rand(batch, q_len, head_dim // 2, generator=generator) * 100
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype).unsqueeze(1)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype).unsqueeze(1)
    down = torch.randn(kv_heads, head_dim, rank, generator=generator) / head_dim**0.5
    args = tuple(x.to(DEVICE) for x in (keys, cos, sin, down))
    expected = rope_lowrank_project_reference(*args)
    got = rope_lowrank_project_triton(*args)
    # The reference rounds RoPE to the input dtype before projecting; the kernel stays in fp32.
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@KERNEL_SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.sampled_from([1, 2, 3, 4, 8]), st.integers(1, 600),
                    st.sampled_from([64, 128]), st.integers(1, 64), st.integers(1, 64)),
    dtype=DTYPES, seed=st.integers(0, 2**16),
)
def test_lowrank_decode_attention_matches_the_reference(shape, dtype, seed):
    from kvc_compile.plugins.triton.lowrank import (
        lowrank_decode_attention_reference,
        lowrank_decode_attention_triton,
    )

    batch, kv_heads, group, total, head_dim, rank, value_rank = shape
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=generator).to(dtype)
    key_up = torch.randn(kv_heads, head_dim, rank, generator=generator) / rank**0.5
    keys = torch.randn(batch, kv_heads, total, rank, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, total, value_rank, generator=generator).to(dtype)
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[-1, : total - 1] = torch.rand(total - 1, generator=generator) < 0.8  # the newest key is always real
    args = tuple(x.to(DEVICE) for x in (query, key_up, keys, values, valid))
    expected = lowrank_decode_attention_reference(*args, head_dim**-0.5)
    got = lowrank_decode_attention_triton(*args, head_dim**-0.5, chunk=128)
    tolerance = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


# Long-context shapes, compiled on the GPU only (the interpreter would take minutes per case): grids
# of thousands of programs, offsets past 2^24 elements, Llama-3-8B's heads (32 query, 8 KV, d 128).
def on_gpu(test):
    """The ``gpu`` marker, and a skip without CUDA."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (compiled kernels)")
    return pytest.mark.gpu(needs_cuda(test))


HALF_DTYPES = [torch.float16, torch.bfloat16]


@on_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("variant", [None, "kv"])  # None: the votes; "kv": OBCache's joint saliency
def test_window_scores_at_long_contexts_on_the_gpu(dtype, n, variant):
    from kvc_compile.methods.scoring import window_output_saliency
    from kvc_compile.plugins.triton.window_scores import output_saliency_triton, window_votes_triton

    generator = torch.Generator(device="cuda").manual_seed(n)
    queries = torch.randn(1, 32, n, 128, device="cuda", generator=generator).to(dtype)
    keys = (2 * torch.randn(1, 8, n, 128, device="cuda", generator=generator)).to(dtype)
    values = torch.randn(1, 8, n, 128, device="cuda", generator=generator).to(dtype)
    valid = torch.ones(1, n, dtype=torch.bool, device="cuda")
    valid[:, : n // 3] = False  # a long left padding
    if variant is None:
        expected = window_votes(queries, keys, valid, 32)
        got = window_votes_triton(queries, keys, valid, 32)
        torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=1e-4)
    else:
        expected = window_output_saliency(queries, keys, values, valid, 32, variant)
        got = output_saliency_triton(queries, keys, values, valid, 32, variant)
        torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()) + 1e-6, rtol=1e-4)


@on_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [4096, 32768])
def test_selection_at_long_contexts_on_the_gpu(dtype, n):
    from kvc_compile.compression.layout import gather_kept
    from kvc_compile.plugins.triton.compaction import (
        select_and_gather_triton,
        stable_select_reference,
        top_positions_triton,
    )

    generator = torch.Generator(device="cuda").manual_seed(n)
    scores = (4 * torch.randn(1, 8, n, device="cuda", generator=generator)).round()  # plateaus of ties
    scores[..., -32:] = float("inf")
    keys = torch.randn(1, 8, n, 128, device="cuda", generator=generator).to(dtype)
    values = torch.randn_like(keys)
    kept_keys, kept_values, positions = select_and_gather_triton(scores, keys, values, n // 2)
    expected = stable_select_reference(scores, n // 2)
    assert torch.equal(positions.long(), expected)
    assert torch.equal(kept_keys, gather_kept(keys, expected))
    assert torch.equal(kept_values, gather_kept(values, expected))
    # AdaKV's layer-wide selection: one row of 8 * n entries.
    flat = scores.view(1, 1, 8 * n)
    assert torch.equal(top_positions_triton(flat, 4 * n), stable_select_reference(flat, 4 * n))


@on_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [4096, 32768])
def test_decode_attention_at_long_contexts_on_the_gpu(dtype, n):
    from kvc_compile.compression.attention import packed_attention_reference
    from kvc_compile.plugins.triton.decode_attention import packed_attention_triton
    from kvc_compile.plugins.triton.lowrank import (
        lowrank_decode_attention_reference,
        lowrank_decode_attention_triton,
    )

    generator = torch.Generator(device="cuda").manual_seed(n)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    # Packed: half of 8 heads' n entries, heads of different lengths, the new token's entries last.
    total = 8 * n // 2
    query = torch.randn(1, 32, 1, 128, device="cuda", generator=generator).to(dtype)
    keys = torch.randn(1, 1, total, 128, device="cuda", generator=generator).to(dtype)
    values = torch.randn(1, 1, total, 128, device="cuda", generator=generator).to(dtype)
    heads = torch.randint(-1, 8, (1, 1, total), device="cuda", generator=generator, dtype=torch.int32)
    heads[..., -8:] = torch.arange(8, device="cuda", dtype=torch.int32)
    expected = packed_attention_reference(query, keys, values, heads, 8, 128**-0.5)
    got = packed_attention_triton(query, keys, values, heads, 8, 128**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
    # Low rank (KQ-SVD, rank 32 keys and values) over a dense cache with left padding.
    key_up = torch.randn(8, 128, 32, device="cuda", generator=generator) / 128**0.5
    low_keys = torch.randn(1, 8, n, 32, device="cuda", generator=generator).to(dtype)
    low_values = torch.randn(1, 8, n, 32, device="cuda", generator=generator).to(dtype)
    valid = torch.ones(1, n, dtype=torch.bool, device="cuda")
    valid[:, : n // 4] = False
    args = (query, key_up, low_keys, low_values, valid, 128**-0.5)
    got = lowrank_decode_attention_triton(*args)
    torch.testing.assert_close(got.float(), lowrank_decode_attention_reference(*args).float(),
                               atol=tolerance, rtol=tolerance)
