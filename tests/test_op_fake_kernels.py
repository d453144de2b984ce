"""Every ``kvc::`` op's fake kernel agrees with its real kernel (shapes, strides, dtypes) on the
calls that real models make, edge cases first: prompts of one token, prompts no longer than the
observation window, keep-everything ratios and budgets, a budget of one entry, left padding.

Inductor trusts the fake kernel's strides when it plans buffers (``assert_size_stride``), so a
real kernel that returns another layout crashes the default path while the eager inner backend
runs fine. The calls are recorded from the pass-rewritten graphs run eagerly, then each is
replayed through ``torch.library.opcheck``'s fake-tensor test.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import random_prompt, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from kvc_compile import CompressedCache
from kvc_compile.config import CompressionConfig
from kvc_compile.eval.lowrank import calibrate_lowrank
from kvc_compile.lookahead import decode_step, prompt_position_ids
from kvc_compile.passes import PassManager
from kvc_compile.transformers_compat import with_cache


def _copy(value):
    """A copy that keeps the strides (the layouts the real kernel saw are what is under test)."""
    if isinstance(value, torch.Tensor):
        copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return copy.copy_(value)
    if isinstance(value, list | tuple):
        return type(value)(_copy(item) for item in value)
    return value


class KvcCalls(TorchDispatchMode):
    """Records each ``kvc::`` op call (op, copied arguments) on its way to the real kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "kvc":
            self.calls.append((func, _copy(args), _copy(kwargs)))
        return func(*args, **kwargs)


def recording_backend(calls: KvcCalls, options: dict):
    """The kvc passes, then the rewritten graph run eagerly with its kvc calls recorded."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        PassManager(CompressionConfig.from_options(options)).run(gm)

        def run(*args):
            with calls:
                return gm.forward(*args)

        return run

    return backend


def record_calls(model, options: dict, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[tuple]:
    calls = KvcCalls()
    compiled = torch.compile(model, backend=recording_backend(calls, options), dynamic=True)
    cache = CompressedCache()
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask, position_ids=prompt_position_ids(ids, mask), **with_cache(cache),
                       use_cache=True)
        token, step = out.logits[:, -1:].argmax(-1), decode_step(compiled, cache)
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            token = step(token, mask).argmax(-1, keepdim=True)
    return calls.calls


@functools.cache
def projections_file(tmp_dir: str) -> str:
    path = f"{tmp_dir}/tiny-llama.safetensors"
    calibrate_lowrank(tiny_model("llama"), [random_prompt(1, 64, seed=9)], rank=16).save(path)
    return path


WINDOW = {"window_size": 8}
# Per method: the options, and whether it compresses while decoding (then decode steps run too).
METHODS = {
    "snapkv": ({"method": "snapkv", **WINDOW}, False),
    "lava (scores across layers)": ({"method": "lava", **WINDOW}, False),
    "snapkv + kqsvd": ({"method": "snapkv", **WINDOW, "kqsvd": {"key_rank": 6, "value_rank": 4}}, False),
    "h2o while decoding": ({"method": "h2o", "decoding_window": 4, "decoding_interval": 2, "target_size": 6}, True),
    "adakv while decoding (packed)": (
        {"method": "adakv", "scorer_options": WINDOW, "decoding_interval": 2, "target_size": 12}, True),
}
EXTENDED = {
    "adakv (packed)": ({"method": "adakv", "scorer_options": WINDOW}, False),
    "streamingllm": ({"method": "streamingllm"}, False),
    "pyramidkv (layer budgets)": ({"method": "pyramidkv", **WINDOW}, False),
    "expected attention while decoding": (
        {"method": "expected_attention", "decoding_window": 4, "decoding_interval": 2, "target_size": 6}, True),
    "morphkv": ({"method": "morphkv", "window_size": 4}, True),
    "criticaladakv (packed, o_proj as an input)": ({"method": "criticaladakv", "scorer_options": WINDOW}, False),
}
# The budgets, each with the prompt lengths it runs: one token, shorter than and as long as the
# window (kept whole), a prompt that compresses, and budgets that keep everything or one entry.
BUDGETS = (
    ({"compression_ratio": 0.5}, (1, 5, 8, 20)),
    ({"compression_ratio": 0.0}, (20,)),
    ({"budget": 64}, (20,)),
    ({"compression_ratio": 0.95}, (20,)),
)
# MorphKV keeps a constant cache: a budget the prompt fits in, then one it exceeds.
CONSTANT_CACHE_BUDGETS = (({"budget": 12}, (1, 5, 20)), ({"budget": 64}, (20,)))


def relaid(value):
    """The same values with the middle axes swapped in memory: a layout Inductor may hand an op."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.transpose(1, 2).contiguous().transpose(1, 2)
    if isinstance(value, list | tuple):
        return type(value)(relaid(item) for item in value)
    return value


def check_calls(calls: list[tuple], case: str) -> None:
    assert calls, f"no kvc op ran ({case})"
    for op, args, kwargs in calls:
        for layout, (a, k) in (("contiguous", (args, kwargs)), ("transposed", (relaid(args), relaid(kwargs)))):
            try:
                torch.library.opcheck(op, a, k, test_utils=("test_faketensor",))
            except Exception as error:  # opcheck wraps the mismatch; name the op and the case
                raise AssertionError(f"{op} ({case}, {layout} inputs): {error.__cause__ or error}") from error


def run_method(method: str, options: dict, decodes: bool, tmp_dir: str) -> None:
    if "kqsvd" in options:
        options = {**options, "kqsvd": {**options["kqsvd"], "projections": projections_file(tmp_dir)}}
    model = tiny_model("llama", attn_implementation="kvc" if "packed" in method else "sdpa")
    budgets = CONSTANT_CACHE_BUDGETS if options["method"] == "morphkv" else BUDGETS
    for budget, lengths in budgets:
        if decodes and "budget" in budget and budgets is BUDGETS:
            continue  # decode-time compression states its own target_size
        torch._dynamo.reset()  # one dynamic graph serves the lengths, recompiling only where guards ask
        for length in lengths:
            ids = random_prompt(2, length, seed=3)
            mask = torch.ones_like(ids)
            if length > 4:
                mask[1, :3] = 0  # a left-padded row
            calls = record_calls(model, {**options, **budget}, ids, mask, steps=3 if decodes else 0)
            check_calls(calls, f"{method}, {budget}, {length}-token prompt")


@pytest.mark.parametrize("method", list(METHODS))
def test_fake_kernels_match_real_kernels(method, tmp_path_factory):
    run_method(method, *METHODS[method], str(tmp_path_factory.getbasetemp()))


@pytest.mark.extended
@pytest.mark.parametrize("method", list(EXTENDED))
def test_fake_kernels_match_real_kernels_extended(method, tmp_path_factory):
    run_method(method, *EXTENDED[method], str(tmp_path_factory.getbasetemp()))
