"""What the compiled path must never do quietly: accept what the reference refuses, run uncompressed,
decode wrong tokens, hold more than transformers' own cache, or leave a long step without a word."""

import math

import pytest
import torch
from conftest import random_prompt, tiny_model
from transformers import DynamicCache

import kvc_compile
from kvc_compile import CompressedCache, CompressionConfig, cache_nbytes, reference_generate, reference_prefill
from kvc_compile.backend import PaddedBatchError, RecompileLimitWarning
from kvc_compile.compression.lowrank import CalibrationMismatchError
from kvc_compile.eval.lowrank import calibrate_lowrank
from kvc_compile.methods import METHODS
from kvc_compile.transformers_compat import CACHE_ARG, output_cache, with_cache

PROMPT = 40
KNORM = {"method": "knorm", "compression_ratio": 0.5, "inner_backend": "eager", "verbose": False}


def generate(model, ids, cache, new_tokens=8, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **with_cache(cache),
                              return_dict_in_generate=True, **kwargs)


def test_projections_of_another_model_are_refused_by_the_compiled_path_too(tmp_path):
    path = tmp_path / "tiny-llama.safetensors"
    calibrate_lowrank(tiny_model("llama"), [random_prompt(1, 64, seed=9)], rank=8).save(path)
    options = {"method": "kqsvd", "projections": str(path), "inner_backend": "eager", "verbose": False}
    other = tiny_model("llama", attn_implementation="kvc", seed=1)  # same shapes, other weights
    ids = random_prompt(1, PROMPT)
    with pytest.raises(CalibrationMismatchError, match="weights_sha256"):
        reference_prefill(other, ids, options)
    compiled = torch.compile(other, backend="kvc", options=options)
    with torch.no_grad(), pytest.raises(Exception, match="CalibrationMismatchError: .*calibrated for another model"
                                                         ".*weights_sha256"):
        compiled(ids, use_cache=True, **with_cache(CompressedCache()))


def test_reaching_the_recompile_limit_says_the_cache_goes_uncompressed():
    compiled = torch.compile(tiny_model("llama"), backend="kvc", options=KNORM, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        compiled(random_prompt(1, 20), use_cache=True)  # the first of two allowed compilations: no warning
        with pytest.warns(RecompileLimitWarning, match=r"recompile_limit = 2.*NOT be compressed.*dynamic=True"):
            compiled(random_prompt(1, 30), use_cache=True)


def test_dynamic_compilation_stays_below_the_limit():
    compiled = torch.compile(tiny_model("llama"), backend="kvc", options=KNORM, dynamic=True)
    import warnings

    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RecompileLimitWarning)
        for length in (20, 30, 40):
            out = compiled(random_prompt(1, length), use_cache=True)
            assert output_cache(out).layers[0].keys.shape[-2] == length // 2


def padded_batch():
    ids = random_prompt(2, PROMPT)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_left_padded_batch_with_a_plain_dynamic_cache_is_refused_with_the_fix():
    model = tiny_model("qwen2")
    ids, mask = padded_batch()
    model.compile(backend="kvc", options=KNORM)
    with pytest.raises(PaddedBatchError, match=rf"batch is padded.*{CACHE_ARG}=kvc_compile.CompressedCache\(\)"):
        generate(model, ids, None, attention_mask=mask)
    # The fix gives the reference's tokens; an unpadded batch still works with the default cache.
    expected = reference_generate(model, ids, KNORM, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(generate(model, ids, CompressedCache(), attention_mask=mask).sequences[:, PROMPT:], expected)
    unpadded = random_prompt(2, PROMPT, seed=3)
    expected = reference_generate(model, unpadded, KNORM, max_new_tokens=8)
    assert torch.equal(generate(model, unpadded, DynamicCache()).sequences[:, PROMPT:], expected)


def mixed_qwen2():
    """Layer 0 attends to everything, layer 1 slides over a 16-token window."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    return model


def test_sliding_window_layers_keep_only_their_window():
    model = mixed_qwen2()
    ids = random_prompt(1, PROMPT)
    with torch.no_grad():
        plain = output_cache(model(ids, use_cache=True))  # transformers' own cache: the window, uncompressed
    compiled = torch.compile(model, backend="kvc", options=KNORM, dynamic=True)
    with torch.no_grad():
        out = compiled(ids, use_cache=True, **with_cache(CompressedCache(config=model.config)))
    assert [layer.keys.shape[-2] for layer in output_cache(out).layers] == [20, 15]
    assert cache_nbytes(output_cache(out)) < cache_nbytes(plain)
    # Decoding keeps the window and the reference's tokens (the reference treats the layer the same way).
    expected = reference_generate(model, ids, KNORM, max_new_tokens=20)
    model.compile(backend="kvc", options=KNORM, dynamic=True)
    generated = generate(model, ids, CompressedCache(config=model.config), new_tokens=20)
    assert torch.equal(generated.sequences[:, PROMPT:], expected)
    assert [layer.keys.shape[-2] for layer in output_cache(generated).layers] == [20 + 19, 15]


def test_a_cache_that_ignores_sliding_windows_is_refused_with_the_fix():
    model = mixed_qwen2()
    compiled = torch.compile(model, backend="kvc", options=KNORM, dynamic=True)
    with torch.no_grad(), pytest.raises(Exception, match=r"sliding-window.*CompressedCache\(config=model.config\)"):
        compiled(random_prompt(1, PROMPT), use_cache=True, **with_cache(CompressedCache()))


def test_a_model_whose_every_layer_slides_is_refused_on_both_paths():
    model = tiny_model("mistral", sliding_window=16)
    ids = random_prompt(1, PROMPT)
    compiled = torch.compile(model, backend="kvc", options=KNORM, dynamic=True)
    for cache in (CompressedCache(), CompressedCache(config=model.config)):
        with torch.no_grad(), pytest.raises(Exception, match="(?i)sliding-window"):
            compiled(ids, use_cache=True, **with_cache(cache))
    with pytest.raises(Exception, match="every layer slides"):
        reference_prefill(model, ids, KNORM)


def test_list_methods_lists_every_accepted_method():
    listed = kvc_compile.list_methods()
    assert "kqsvd" in listed and set(METHODS) | {"kqsvd"} == set(listed)
    for name in listed:  # accepted: any error is about the method's own options, never an unknown name
        try:
            CompressionConfig.from_options({"method": name, "budget": 64})
        except ValueError as error:
            assert "unknown method" not in str(error), name
    with pytest.raises(ValueError, match="unknown method 'kqsv'; valid methods: .*kqsvd"):
        CompressionConfig.from_options({"method": "kqsv", "budget": 64})


def test_packed_method_without_kvc_attention_names_the_fix():
    model = tiny_model("llama")  # attn_implementation="sdpa"
    options = {"method": "adakv", "compression_ratio": 0.5, "scorer_options": {"window_size": 8},
               "inner_backend": "eager", "verbose": False}
    model.compile(backend="kvc", options=options, dynamic=True)
    with pytest.raises(Exception, match="attn_implementation='kvc'") as error:
        generate(model, random_prompt(1, PROMPT), CompressedCache(), new_tokens=3)
    assert "use_cache" not in str(error.value) and "sliding" not in str(error.value)


def test_each_compilation_says_what_it_compiles(capfd, monkeypatch):
    ids = random_prompt(1, PROMPT)
    with torch.no_grad():
        torch.compile(tiny_model("llama"), backend="kvc", options=KNORM | {"verbose": True})(ids, use_cache=True)
    err = capfd.readouterr().err
    assert "kvc: compiling the prefill graph of LlamaForCausalLM (knorm, 2 attention sites, eager) ... done in" in err
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_model("llama"), backend="kvc", options=KNORM)(ids, use_cache=True)  # verbose=False
    monkeypatch.setenv("KVC_VERBOSE", "0")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny_model("llama"), backend="kvc", options=KNORM | {"verbose": True})(ids, use_cache=True)
    assert "kvc: compiling" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        ({"compression_ratio": math.nan}, "compression_ratio must be a number in [0, 1)"),
        ({"compression_ratio": math.inf}, "compression_ratio must be a number in [0, 1)"),
        ({"compression_ratio": 1.5}, "compression_ratio must be a number in [0, 1)"),
        ({"compression_ratio": -0.5}, "compression_ratio must be a number in [0, 1)"),
        ({"compression_ratio": "0.5"}, "compression_ratio must be a number in [0, 1)"),
        ({"budget": 0}, "budget must be a positive integer"),
        ({"budget": -8}, "budget must be a positive integer"),
        ({"budget": 8.0}, "budget must be a positive integer"),
        ({"budget": True}, "budget must be a positive integer"),
        ({"budget": 16, "decoding_interval": 0, "target_size": 16}, "decoding_interval must be a positive integer"),
        ({"budget": 16, "decoding_interval": 4}, "needs both decoding_interval"),
        ({"compression_ratio": 0.5, "verbose": "no"}, "verbose must be True or False"),
    ],
)
def test_out_of_range_options_are_refused(options, message):
    with pytest.raises(ValueError) as error:
        CompressionConfig.from_options({"method": "knorm", **options})
    assert message in str(error.value)


def test_options_that_would_be_ignored_are_refused(tmp_path):
    with pytest.raises(ValueError, match="options must be a dict"):
        CompressionConfig.from_options("snapkv")
    path = tmp_path / "tiny-llama.safetensors"
    calibrate_lowrank(tiny_model("llama"), [random_prompt(1, 32, seed=9)], rank=4).save(path)
    # kqsvd alone never evicts: decode-time compression options would do nothing.
    with pytest.raises(ValueError, match="kqsvd alone keeps every token"):
        CompressionConfig.from_options({"method": "kqsvd", "projections": str(path), "decoding_interval": 4,
                                        "target_size": 16})
