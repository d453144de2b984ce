"""Generation with Lookahead Q-Cache (``method="laq"``): prefill, rollout, re-score, decode.

    model.compile(backend="kvc", options={"method": "laq", "budget": 256})
    tokens = kvc_compile.lookahead_generate(model, input_ids, {"method": "laq", "budget": 256}, 64)

1. The compiled prefill keeps the stage-1 cache (SnapKV by default), the full prompt entries and
   each layer's last ``window_size + lookahead`` queries (the kvc pass wires all three).
2. ``lookahead`` greedy pseudo tokens are decoded on the stage-1 cache by the compiled decode graph,
   each step shifting its queries into the buffer. The number of steps is fixed and nothing is read
   back to the host: a row that emits EOS keeps going, and its later queries are masked.
3. Stage 2 re-scores every layer's full prompt with the buffered queries (``LAQ.lookahead_scores``)
   and replaces the cache; the pseudo entries, the stage-1 cache and the prompt copy are dropped and
   the logical length returns to the prompt's.
4. Decoding restarts from the first token, greedily, on the stage-2 cache.

The eager reference (``kvc_compile.reference``) runs the same rollout and stage 2 with captured
queries instead of compiled graphs, and engines (``kvc_compile.engine.runtime``) run the same
decoding loop (``generate_tokens``) and rollout with their exported programs as the step.
``model.generate`` on a model compiled with ``laq`` only gets stage 1, so decoding such a cache
outside this loop is refused with an error saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kvc_compile.cache import CompressedCache, CompressedLayer
from kvc_compile.compression.lookahead import stage2_entries
from kvc_compile.config import CompressionConfig
from kvc_compile.inputs import check_prompt_ids
from kvc_compile.ops.kernels import device_kernels
from kvc_compile.transformers_compat import with_cache

Step = Callable[[Tensor, Tensor], Tensor]  # (token [batch, 1], mask [batch, length]) -> logits [batch, vocab]
TokenCallback = Callable[[int, Tensor], None]  # (index, tokens [batch]) after each generated token


def _greedy(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


def prompt_position_ids(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Positions counted from each row's first real token (left padding), as generation uses them."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def decode_step(forward: Callable, cache: CompressedCache) -> Step:
    """One greedy decoding step of ``forward`` (a model or its compiled call) on ``cache``."""

    def step(token: Tensor, mask: Tensor) -> Tensor:
        position_ids = mask.long().cumsum(-1)[:, -1:] - 1
        out = forward(input_ids=token, attention_mask=mask, position_ids=position_ids, **with_cache(cache),
                      use_cache=True)
        return out.logits[:, -1]

    return step


def generate_tokens(
    step: Step,
    first_token: Tensor,
    mask: Tensor,
    n_tokens: int,
    *,
    pick: Callable[[Tensor], Tensor] = _greedy,
    eos: Tensor | None = None,
    pad_token_id: int = 0,
    on_token: TokenCallback | None = None,
) -> Tensor:
    """Up to ``n_tokens`` tokens [batch, t], the first given ([batch, 1]), each next picked by ``pick``
    (default: greedy) from ``step`` on the mask grown by one token.

    With ``eos`` (token ids), a row that emitted one gets ``pad_token_id`` from then on, and the loop
    stops once every row has (which reads a flag back to the host each step); without it, exactly
    ``n_tokens`` and no host sync."""
    token = first_token[:, 0]
    finished = torch.isin(token, eos) if eos is not None else None
    tokens = [token]
    if on_token is not None:
        on_token(0, token)
    for index in range(1, n_tokens):
        if finished is not None and bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        token = pick(step(token[:, None], mask))
        if finished is not None:
            token = token.masked_fill(finished, pad_token_id)
            finished |= torch.isin(token, eos)
        tokens.append(token)
        if on_token is not None:
            on_token(index, token)
    return torch.stack(tokens, dim=-1)


def greedy_tokens(step: Step, first_token: Tensor, mask: Tensor, n_tokens: int) -> Tensor:
    """``n_tokens`` greedy tokens [batch, n_tokens], the first given, each next from ``step``."""
    return generate_tokens(step, first_token, mask, n_tokens)


def _eos_ids(eos_token_id: int | Tensor | None, device: torch.device) -> Tensor:
    if isinstance(eos_token_id, Tensor):
        return eos_token_id
    return torch.tensor([] if eos_token_id is None else [eos_token_id], dtype=torch.long, device=device)


def rollout(step: Step, first_token: Tensor, mask: Tensor, steps: int, eos_token_id: int | Tensor | None) -> Tensor:
    """Feed ``steps`` greedy pseudo tokens from ``first_token`` [batch, 1]; [batch, steps] bool: whose
    query votes. ``eos_token_id``: one id, a tensor of them, or None.

    A token's query votes unless an EOS was emitted before it (the official code stops there). The
    number of steps is fixed: nothing is read back to the host.
    """
    eos = _eos_ids(eos_token_id, first_token.device)
    alive = ~torch.isin(first_token[:, 0], eos)
    token, voting = first_token, []
    for _ in range(steps):
        voting.append(alive)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        token = step(token, mask).argmax(dim=-1, keepdim=True)
        alive = alive & ~torch.isin(token[:, 0], eos)
    return torch.stack(voting, dim=1)


def rescore_layer(config: CompressionConfig, layer: CompressedLayer, prompt_mask: Tensor, pseudo_valid: Tensor) -> None:
    """Stage 2 for one layer: keep the prompt entries the buffered queries vote for; forget the rest."""
    keys = layer.prompt_keys
    batch, kv_heads, n, _ = keys.shape
    with device_kernels(keys):
        compressed = stage2_entries(config.method_impl, config.kept_length(n), keys, layer.prompt_values,
                                    layer.recent_queries, prompt_mask, pseudo_valid)
    no_queries = layer.recent_queries.new_empty(batch, 0, 0, layer.recent_queries.shape[-1])
    layer.set_compressed(compressed, logical_length=n, kv_heads=kv_heads, recent_queries=no_queries)
    layer.prompt_keys = layer.prompt_values = None


def lookahead_stage(
    config: CompressionConfig,
    step: Step,
    cache: CompressedCache,
    first_token: Tensor,
    prompt_mask: Tensor,
    eos_token_id: int | None = None,
) -> Tensor:
    """Roll out the pseudo tokens on the stage-1 ``cache``, then re-score every layer (stage 2).

    Returns [batch, lookahead] bool: which pseudo queries voted.
    """
    method = config.method_impl
    if not all(layer.prompt_keys is not None and layer.prompt_keys.shape[2] > 0 for layer in cache.layers):
        raise RuntimeError(
            "kvc: the cache holds no full prompt entries for LAQ's second stage; compile the model with "
            "backend='kvc' and the same laq options, and prefill with a kvc_compile.CompressedCache"
        )
    for layer in cache.layers:
        layer.rolling_out = True
    pseudo_valid = rollout(step, first_token, prompt_mask, method.lookahead, eos_token_id)
    for layer in cache.layers:
        rescore_layer(config, layer, prompt_mask, pseudo_valid)
        layer.rolling_out = False
    return pseudo_valid


@torch.no_grad()
def lookahead_generate(
    model: torch.nn.Module,
    input_ids: Tensor,
    options: CompressionConfig | dict[str, Any],
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
) -> Tensor:
    """Greedy tokens [batch, max_new_tokens] with LAQ, from a model compiled with these ``options``.

    ``model`` is called as it is: compile it first (``model.compile(backend="kvc", options=options)``).
    """
    config = options if isinstance(options, CompressionConfig) else CompressionConfig.from_options(options)
    if not config.evicts or not config.method_impl.lookahead_queries:
        raise ValueError(f"lookahead_generate runs LAQ (method='laq'); got method={config.method!r}")
    check_prompt_ids(input_ids, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = CompressedCache()
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=prompt_position_ids(input_ids, attention_mask),
        **with_cache(cache), use_cache=True,
    )
    first_token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    step = decode_step(model, cache)
    lookahead_stage(config, step, cache, first_token, attention_mask, eos_token_id)
    return greedy_tokens(step, first_token, attention_mask, max_new_tokens)


__all__ = ["decode_step", "generate_tokens", "greedy_tokens", "lookahead_generate", "lookahead_stage", "rollout",
           "stage2_entries"]
