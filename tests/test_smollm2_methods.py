"""One method per mechanism on SmolLM2-135M through the kvc pass (eager inner backend: the point is
the pass), against the eager reference: kept entries, greedy tokens, cache size after generate().
Every registered method is checked the same way on tiny configs (tests/test_methods_compiled.py);
here each scoring and layout mechanism meets a real 30-layer model."""

import pytest
import torch

from kvc_compile import CompressedCache, reference_generate, reference_prefill
from kvc_compile.eval.passkey import passkey_inputs
from kvc_compile.transformers_compat import output_cache, with_cache

pytestmark = pytest.mark.smollm2
NEW_TOKENS = 6
# A window scorer, a pre-RoPE scorer (rotary tables from the graph), and packed budgets that vary
# across layers with data-dependent sizes (lava). Compactor (pre-RoPE too), AdaKV (head-adaptive
# packed budgets) and PyramidKV (per-layer packed budgets) repeat those mechanisms and run with
# -m extended; every method is compiled against the reference on tiny configs by default.
# MorphKV and LAQ: tests/test_smollm2_decoding.py.
MECHANISMS = ("snapkv", "expected_attention", "lava",
              *(pytest.param(method, marks=pytest.mark.extended) for method in ("compactor", "adakv", "pyramidkv")))


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    return passkey_inputs(tokenizer, target_tokens=600, seed=1)[1]


def reference_and_compiled(model, prompt, options):
    """The reference prefill and greedy tokens, then the compiled model's generate() output."""
    original_attention = model.config._attn_implementation
    model.set_attn_implementation("kvc")  # SDPA for dense caches, the packed/low-rank reader otherwise
    try:
        reference = reference_prefill(model, prompt, options)
        expected = reference_generate(model, prompt, options, max_new_tokens=NEW_TOKENS)
        model.compile(backend="kvc", options=options, dynamic=True)
        with torch.no_grad():
            out = model.generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **with_cache(CompressedCache()),
                return_dict_in_generate=True,
            )
    finally:
        model._compiled_call_impl = None  # leave the shared model eager
        model.set_attn_implementation(original_attention)
    return reference, expected, out


@pytest.mark.parametrize("method", MECHANISMS)
def test_method_generate_equals_reference(smollm2, prompt, method):
    model, _ = smollm2
    options = {"method": method, "compression_ratio": 0.5, "inner_backend": "eager"}
    n = prompt.shape[1]
    reference, expected, out = reference_and_compiled(model, prompt, options)
    assert torch.equal(out.sequences[:, n:], expected)
    kv_heads = model.config.num_key_value_heads
    entries = 0
    for layer, positions, heads in zip(output_cache(out).layers, reference.kept_indices, reference.kept_heads,
                                       strict=True):
        assert torch.equal(layer.positions[..., : positions.shape[-1]], positions)
        assert torch.equal(layer.heads[..., : heads.shape[-1]], heads)
        entries += heads.numel()
    # Whatever the layout, the layers together keep the budget: kv_heads x n // 2 entries per layer.
    assert entries == len(output_cache(out).layers) * kv_heads * (n // 2)


@pytest.fixture(scope="module")
def smollm2_projections(smollm2, tmp_path_factory):
    """KQ-SVD projections of SmolLM2 at full width, written by the kvc-calibrate command."""
    from kvc_compile.cli.calibrate import main as calibrate

    path = tmp_path_factory.mktemp("kqsvd") / "smollm2.safetensors"
    assert calibrate(["--out", str(path), "--sequences", "1", "--sequence-tokens", "512", "--rank", "64"]) == 0
    return str(path)


def test_snapkv_with_kqsvd_generate_equals_reference(smollm2, prompt, smollm2_projections):
    from kvc_compile.compression.lowrank import LowRankProjections

    model, _ = smollm2
    projections = LowRankProjections.load(smollm2_projections, model)  # calibrated on this very model
    assert projections.key_ranks == [64] * model.config.num_hidden_layers
    options = {"method": "snapkv", "compression_ratio": 0.5, "inner_backend": "eager",
               "kqsvd": {"projections": smollm2_projections, "key_rank": 32, "value_rank": 48}}
    n = prompt.shape[1]
    _, expected, out = reference_and_compiled(model, prompt, options)
    assert torch.equal(out.sequences[:, n:], expected)
    layer = output_cache(out).layers[0]
    assert layer.keys.shape[-1] == 32 and layer.values.shape[-1] == 48
    assert layer.keys.shape[-2] == n // 2 + NEW_TOKENS - 1  # half the prompt, then the decoded tokens


def test_the_tokenizer_ends_and_pads_with_the_models_tokens(smollm2):
    """On every transformers version we run on (5.17 reads the GGUF tokenizer's end token as <|im_start|>)."""
    model, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id
    batch = tokenizer(["Hi", "How are you today?"], return_tensors="pt", padding=True)
    assert batch.input_ids.shape[0] == 2
