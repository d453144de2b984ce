import pytest
import torch

from kvc_compile import CompressionConfig, list_methods


def test_registry_lists_first_methods():
    assert {"snapkv", "streamingllm", "knorm", "random"} <= set(list_methods())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "snapk", "compression_ratio": 0.5}, "unknown method 'snapk'; valid methods: "),
        ({"method": "snapkv", "compression_ratio": 1.0}, "compression_ratio must be a number in [0, 1)"),
        ({"method": "snapkv", "compression_ratio": -0.1}, "compression_ratio must be a number in [0, 1)"),
        ({"method": "snapkv", "compression_ratio": 0.5, "budget": 64}, "give exactly one of compression_ratio"),
        ({"method": "snapkv"}, "got neither"),
        ({"method": "snapkv", "budget": 0}, "budget must be a positive integer"),
        ({"method": "snapkv", "compression_ratio": 0.5, "window_size": 0}, "window_size must be a positive integer"),
        ({"method": "snapkv", "compression_ratio": 0.5, "window_size": -4}, "window_size must be a positive integer"),
        ({"method": "snapkv", "compression_ratio": 0.5, "kernel_size": 4}, "kernel_size must be a positive odd"),
        ({"method": "snapkv", "compression_ratio": 0.5, "pooling": "median"}, "valid choices: avg, max"),
        ({"method": "snapkv", "compression_ratio": 0.5, "windw_size": 8}, "unknown option(s) 'windw_size'"),
        ({"method": "knorm", "compression_ratio": 0.5, "window_size": 8}, "valid options: method, compression_ratio"),
        ({"method": "snapkv", "compression_ratio": 0.5, "window_size": 8.5}, "must be of type int"),
        ({"method": "snapkv", "compression_ratio": 0.5, "inner_backend": "aot"}, "valid choices: inductor, eager"),
        ({"compression_ratio": 0.5}, "must name a 'method'"),
        ({"method": "snapkv", "compression_ratio": 0.5, "tune_decode": "yes"}, "tune_decode must be True or False"),
    ],
)
def test_bad_options_are_rejected_with_the_fix(options, message):
    with pytest.raises(ValueError) as error:
        CompressionConfig.from_options(options)
    assert message in str(error.value)


def test_bad_options_fail_before_compilation():
    """The backend validates first: the error surfaces from the first call, naming the problem."""
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="kvc", options={"method": "snapkv", "compression_ratio": 2})
    with pytest.raises(Exception, match=r"compression_ratio must be a number in \[0, 1\)"):
        compiled(torch.randn(2, 4))


@pytest.mark.parametrize(
    "options, n, expected",
    [
        ({"compression_ratio": 0.5}, 200, 100),
        ({"compression_ratio": 0.5}, 201, 100),  # floor(n * (1 - ratio))
        ({"compression_ratio": 0.75}, 203, 50),
        ({"compression_ratio": 0.7}, 210, 63),  # exact arithmetic: 0.3 * 210 is 63, not 62.99...
        ({"compression_ratio": 0.0}, 200, 200),
        ({"compression_ratio": 0.5}, 64, 64),  # not longer than the window: left whole
        ({"compression_ratio": 0.5}, 65, 32),
        ({"budget": 100}, 300, 100),
        ({"budget": 100}, 80, 80),  # shorter than the budget: left whole
    ],
)
def test_kept_length(options, n, expected):
    config = CompressionConfig.from_options({"method": "snapkv", **options})
    assert config.kept_length(n) == expected


def test_kept_length_without_window_compresses_short_prompts():
    config = CompressionConfig.from_options({"method": "knorm", "compression_ratio": 0.5})
    assert config.kept_length(10) == 5


def test_spec_round_trip():
    config = CompressionConfig.from_options({"method": "snapkv", "budget": 32, "window_size": 8, "pooling": "max"})
    assert CompressionConfig.from_spec(config.to_spec()) == config


def test_how_graphs_compile_is_not_part_of_the_spec():
    """verbose and tune_decode change how a graph is compiled, not what its ops compress."""
    plain = CompressionConfig.from_options({"method": "snapkv", "budget": 32})
    tuned = CompressionConfig.from_options({"method": "snapkv", "budget": 32, "tune_decode": True, "verbose": False})
    assert tuned.tune_decode and not plain.tune_decode
    assert tuned.to_spec() == plain.to_spec()


def test_wrapper_scorer_options_are_checked_like_a_method():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'windw' for method 'snapkv'; valid options: .*window"):
        CompressionConfig.from_options({"method": "adakv", "compression_ratio": 0.5, "scorer_options": {"windw": 8}})
    with pytest.raises(ValueError, match="unknown method 'snap'"):
        CompressionConfig.from_options({"method": "chunkkv", "compression_ratio": 0.5, "scorer": "snap"})
    with pytest.raises(ValueError, match="already chooses its own per-head or per-layer budgets"):
        CompressionConfig.from_options({"method": "adakv", "compression_ratio": 0.5, "scorer": "lava"})
    with pytest.raises(ValueError, match="scorer_options' must be of type dict"):
        CompressionConfig.from_options({"method": "adakv", "compression_ratio": 0.5, "scorer_options": "w=8"})


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("obcache", {"variant": "q"}, "variant"),
        ("obcache", {"base": "pyramid"}, "base"),
        ("curdkv", {"leverage_type": "norm"}, "leverage_type"),
        ("compactor", {"chunk_size": 0}, "chunk_size"),
        ("pyramidkv", {"beta": 0}, "beta"),
        ("lava", {"alpha_safeguard": 1.5}, "alpha_safeguard"),
        ("chunkkv", {"chunk_length": 0}, "chunk_length"),
        ("expected_attention", {"n_future_positions": 0}, "n_future_positions"),
    ],
)
def test_invalid_method_options_name_the_option(method, options, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig.from_options({"method": method, "compression_ratio": 0.5, **options})


def test_window_longer_than_the_prompt_explains_itself():
    from conftest import random_prompt, tiny_model

    from kvc_compile import reference_prefill

    with pytest.warns(UserWarning, match="not longer than snapkv's observation window .* Lower window_size"):
        prefill = reference_prefill(tiny_model("llama"), random_prompt(1, 40), {"method": "snapkv", "budget": 8})
    assert prefill.cache.layers[0].keys.shape[-2] == 40
