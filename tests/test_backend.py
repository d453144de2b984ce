"""The kvc backend on tiny random Llama / Mistral / Qwen2 / Qwen3 decoders (eager inner backend:
the point here is the pass, not the code generation)."""

import subprocess
import sys

import pytest
import torch
from conftest import ARCHITECTURES, random_prompt, tiny_model
from torch._dynamo.utils import counters

from kvc_compile import CompressedCache, CompressionConfig, reference_generate, reference_prefill
from kvc_compile.compression.layout import gather_kept
from kvc_compile.passes import NoAttentionSiteError
from kvc_compile.transformers_compat import output_cache, with_cache

METHOD_OPTIONS = {
    "snapkv": {"window_size": 8},
    "streamingllm": {},
    "knorm": {},
    "random": {"seed": 7},
}
PROMPT = 40


def options(method, inner="eager", **extra):
    return {"method": method, "compression_ratio": 0.5, "inner_backend": inner, **METHOD_OPTIONS[method], **extra}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_compiled_cache_keeps_reference_tokens_and_generates_the_same(arch, method):
    model = tiny_model(arch)
    ids = random_prompt(1, PROMPT)
    opts = options(method)
    n_kept = CompressionConfig.from_options(opts).kept_length(PROMPT)
    reference = reference_prefill(model, ids, opts)
    with torch.no_grad():
        full = output_cache(model(ids, use_cache=True))
        out = torch.compile(model, backend="kvc", options=opts)(ids, use_cache=True)
    torch.testing.assert_close(out.logits, reference.logits)  # prefill attention itself stays exact
    for layer_idx, layer in enumerate(output_cache(out).layers):
        kept = reference.kept_indices[layer_idx]
        assert layer.keys.shape == (1, 2, n_kept, model.config.head_dim if arch == "qwen3" else 16)
        torch.testing.assert_close(layer.keys, gather_kept(full.layers[layer_idx].keys, kept))
        torch.testing.assert_close(layer.values, gather_kept(full.layers[layer_idx].values, kept))

    expected = reference_generate(model, ids, opts, max_new_tokens=12)
    model.compile(backend="kvc", options=opts)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(generated.sequences[:, PROMPT:], expected)
    # The cache shrank during generate(): kept prompt tokens plus the generated ones written back.
    assert [layer.keys.shape[-2] for layer in output_cache(generated).layers] == [n_kept + 11] * 2


def test_eager_attention_pattern_is_found_and_compressed():
    model = tiny_model("llama", attn_implementation="eager")
    ids = random_prompt(1, PROMPT)
    opts = options("snapkv")
    expected = reference_generate(model, ids, opts, max_new_tokens=10)
    model.compile(backend="kvc", options=opts)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, PROMPT:], expected)
    assert output_cache(out).layers[0].keys.shape[-2] == 20 + 9


def test_left_padding_is_never_kept_and_generation_matches_reference():
    model = tiny_model("qwen2")
    ids = random_prompt(3, PROMPT)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :30] = 0  # only 10 real tokens: fewer than the 20 kept, so 10 padding slots are forced
    ids[mask == 0] = 0
    opts = options("snapkv")
    reference = reference_prefill(model, ids, opts, attention_mask=mask)
    for kept in reference.kept_indices:
        assert (kept[1] >= 9).all()
        assert kept[2, :, 10:].min() >= 30 and (kept[2, :, :10] < 30).all()
    expected = reference_generate(model, ids, opts, max_new_tokens=10, attention_mask=mask)
    model.compile(backend="kvc", options=opts)
    counters.clear()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
            **with_cache(CompressedCache()), return_dict_in_generate=True,
        )
    assert torch.equal(out.sequences[:, PROMPT:], expected)
    # Prefill; the first decode step, which moves the kept entries into storage with room to grow; then
    # decode once static and once dynamic: steps write in place, and the length does not recompile.
    assert counters["stats"]["unique_graphs"] <= 4
    # Row 2 keeps all 10 of its real tokens: its padding slots are masked, so it matches the row alone, uncompressed.
    alone_tokens = reference_generate(model, ids[2:3, 30:], opts | {"compression_ratio": 0.0}, max_new_tokens=10)
    assert torch.equal(out.sequences[2:3, PROMPT:], alone_tokens)


def test_direct_forward_continues_at_logical_positions():
    """With CompressedCache a second forward without positions starts at the prompt length."""
    model = tiny_model("llama")
    ids = random_prompt(1, PROMPT)
    opts = options("knorm")
    compiled = torch.compile(model, backend="kvc", options=opts)
    with torch.no_grad():
        cache = CompressedCache()
        first = compiled(ids, **with_cache(cache), use_cache=True)
        assert cache.get_seq_length() == PROMPT and cache.physical_lengths() == [20, 20]
        next_token = first.logits[:, -1:].argmax(-1)
        step = compiled(next_token, **with_cache(cache), use_cache=True)
    reference = reference_generate(model, ids, opts, max_new_tokens=2)
    assert torch.equal(step.logits[:, -1].argmax(-1), reference[:, 1])


def test_prompt_not_longer_than_the_window_is_left_uncompressed():
    model = tiny_model("llama")
    ids = random_prompt(1, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="kvc", options=options("snapkv"))(ids, use_cache=True)
    assert output_cache(out).layers[0].keys.shape[-2] == 8


def test_prompt_not_longer_than_the_budget_is_left_uncompressed():
    model = tiny_model("llama")
    opts = {"method": "knorm", "budget": 64, "inner_backend": "eager"}
    with torch.no_grad():
        out = torch.compile(model, backend="kvc", options=opts)(random_prompt(1, PROMPT), use_cache=True)
    assert output_cache(out).layers[0].keys.shape[-2] == PROMPT


def test_mode_without_options_gets_the_options_error():
    """torch.compile forbids mode together with options; mode alone must still reach a clear message."""
    compiled = torch.compile(tiny_model("llama"), backend="kvc", mode="max-autotune")
    with pytest.raises(Exception, match="the kvc backend needs options"):
        compiled(random_prompt(1, PROMPT), use_cache=True)


def test_budget_keeps_an_absolute_count():
    model = tiny_model("mistral")
    opts = {"method": "knorm", "budget": 12, "inner_backend": "eager"}
    with torch.no_grad():
        out = torch.compile(model, backend="kvc", options=opts)(random_prompt(2, PROMPT), use_cache=True)
    assert [layer.keys.shape for layer in output_cache(out).layers] == [(2, 2, 12, 16)] * 2


def test_new_prompt_length_does_not_recompile_prefill():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="kvc", options=options("snapkv"), dynamic=True)
    counters.clear()
    with torch.no_grad():
        for length in (40, 57, 90):
            out = compiled(random_prompt(1, length), use_cache=True)
            assert output_cache(out).layers[0].keys.shape[-2] == length // 2
    assert counters["stats"]["unique_graphs"] == 1


def test_decode_graphs_are_left_unchanged():
    model = tiny_model("llama")
    seen = []
    from kvc_compile.passes import PassManager

    def recording_backend(gm, example_inputs):
        seen.append(PassManager(CompressionConfig.from_options(options("knorm"))).run(gm))
        return gm.forward

    compiled = torch.compile(model, backend=recording_backend)
    with torch.no_grad():
        out = compiled(random_prompt(1, PROMPT), use_cache=True)
        compiled(out.logits[:, -1:].argmax(-1), **with_cache(output_cache(out)), use_cache=True)
    assert seen == [2, 0]  # two prefill sites rewritten, none in the decode graph


def test_graph_without_attention_names_the_model():
    class TinyMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x).relu()

    compiled = torch.compile(TinyMLP(), backend="kvc", options={"method": "knorm", "compression_ratio": 0.5})
    with pytest.raises(Exception) as error:
        compiled(torch.randn(2, 4))
    assert "TinyMLP" in str(error.value) and "no attention site" in str(error.value)
    assert isinstance(error.value.__cause__ or error.value, (NoAttentionSiteError, Exception))


def test_all_sliding_window_layers_are_reported():
    model = tiny_model("mistral", sliding_window=16)
    compiled = torch.compile(model, backend="kvc", options=options("knorm"))
    # The message names the module whose frame Dynamo traced: the causal LM, or (where transformers breaks
    # the graph before the decoder, as 5.25 does) its inner model.
    with pytest.raises(Exception, match="Mistral(ForCausalLM|Model).*Sliding-window layers"):
        compiled(random_prompt(1, PROMPT), use_cache=True)


def test_inductor_end_to_end_tiny():
    model = tiny_model("qwen3")
    ids = random_prompt(1, PROMPT)
    opts = options("snapkv", inner="inductor")
    expected = reference_generate(model, ids, opts, max_new_tokens=6)
    model.compile(backend="kvc", options=opts)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, PROMPT:], expected)


def test_backend_is_registered_by_entry_point():
    code = (
        "import sys, torch; ok = 'kvc' in torch._dynamo.list_backends(); "
        "sys.exit(0 if ok and 'kvc_compile' not in sys.modules else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class RepeatKVAttention(torch.nn.Module):
    """Attention as transformers writes it when SDPA cannot take enable_gqa: repeat_kv, then plain SDPA."""

    def __init__(self, dim=16, q_heads=4, kv_heads=2, head_dim=8):
        super().__init__()
        self.shape = (q_heads, kv_heads, head_dim)
        self.q_proj = torch.nn.Linear(dim, q_heads * head_dim)
        self.k_proj = torch.nn.Linear(dim, kv_heads * head_dim)
        self.v_proj = torch.nn.Linear(dim, kv_heads * head_dim)

    def forward(self, x):
        batch, n, _ = x.shape
        q_heads, kv_heads, head_dim = self.shape
        q = self.q_proj(x).view(batch, n, q_heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n, kv_heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n, kv_heads, head_dim).transpose(1, 2)

        def repeat_kv(t):
            return t[:, :, None].expand(batch, kv_heads, q_heads // kv_heads, n, head_dim).reshape(
                batch, q_heads, n, head_dim
            )

        out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True)
        return out, q, k, v


def test_sdpa_after_repeat_kv_is_found():
    from kvc_compile.ops import compress_kv

    torch.manual_seed(0)
    module = RepeatKVAttention()
    x = torch.randn(2, 30, 16)
    opts = options("snapkv")
    with torch.no_grad():
        _, q, k, v = module(x)
        spec = CompressionConfig.from_options(opts).to_spec()
        expected_k, expected_v, _, _ = compress_kv(q, k, v, None, None, None, 0, 1, spec)
        _, _, kept_k, kept_v = torch.compile(module, backend="kvc", options=opts)(x)
    assert kept_k.shape == (2, 2, 15, 8)
    torch.testing.assert_close(kept_k, expected_k)
    torch.testing.assert_close(kept_v, expected_v)
