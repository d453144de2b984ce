"""``kvc::compress_kv``: prefill KV compression as one opaque op in the compiled graph.

Inputs are what the attention site already has (post-RoPE queries, the cached keys and values,
the attention mask, the rotary tables when the model has them); the method and budget travel as
a canonical string. The fake implementation gives the kept length as a function of the
(possibly symbolic) prompt length, so the graph stays shape-static with no ``.item()`` and no
host sync.

Methods whose layer budgets depend on every layer (``budgets_across_layers``, e.g. LAVa) use two
ops instead: ``kvc::score_kv`` after each attention site, and one ``kvc::compress_layers`` once
every layer is scored. Its output lengths depend on the scores, so they are data-dependent
(unbacked) sizes in the graph.

``kvc::prefill_entries`` is what ``CompressedCache`` records for an uncompressed prompt (the
position and KV head of every cached entry); the pass rewires it to the entries compression kept.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from kvc_compile.compression.layout import INDEX_DTYPE, CompressedKV, valid_keys_from_mask
from kvc_compile.compression.layout import prefill_entries as dense_entries
from kvc_compile.compression.prefill import compress_layer, compress_layers_jointly, compressed_shapes
from kvc_compile.config import CompressionConfig
from kvc_compile.methods.base import ScoreInputs
from kvc_compile.ops.kernels import device_kernels


class ShortPromptWarning(UserWarning):
    """A prompt no longer than the method's observation window: its cache is kept whole."""

    def __init__(self, message: str, length: int, method: str, window: int) -> None:
        super().__init__(message)
        self.length, self.method, self.window = length, method, window


def site_inputs(
    config: CompressionConfig,
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    layer_idx: int,
    n_layers: int,
    output_weight: Tensor | None = None,
) -> ScoreInputs:
    """What a scorer sees at one site; warns when the prompt is too short to compress.
    ``output_weight``: the layer's ``o_proj.weight``, for methods that read it (None otherwise)."""
    batch, _, n, _ = keys.shape
    method = config.method_impl
    if 0 < n <= method.min_uncompressed_length:
        warnings.warn(
            ShortPromptWarning(
                f"kvc: a {n}-token prompt is not longer than {config.method}'s observation window "
                f"({method.min_uncompressed_length} tokens); its cache is left uncompressed. Lower window_size "
                f"to compress prompts this short.",
                int(n), config.method, method.min_uncompressed_length,
            ),
            stacklevel=2,
        )
    valid = valid_keys_from_mask(attn_mask, batch, n, keys.device)
    return ScoreInputs(query, keys, values, valid, layer_idx, n_layers, cos, sin, output_weight=output_weight)


def compress_site(config: CompressionConfig, *site: Tensor | int | None, scores: Tensor | None = None) -> CompressedKV:
    """What ``kvc::compress_kv`` computes (arguments as ``site_inputs``); the eager reference calls it.
    ``scores``: the method's raw scores of this site, when already computed (``raw_site_scores``)."""
    inputs = site_inputs(config, *site)
    with device_kernels(inputs.keys):
        return compress_layer(config.method_impl, config.kept_length(inputs.keys.shape[2]), inputs, scores)


def raw_site_scores(config: CompressionConfig, *site: Tensor | int | None) -> Tensor | None:
    """The method's scores of one site as ``compress_site`` computes them (dtype kept); None for a
    prompt too short to score, which ``compress_site`` keeps whole."""
    inputs = site_inputs(config, *site)
    if inputs.keys.shape[2] <= config.method_impl.min_uncompressed_length:
        return None
    with device_kernels(inputs.keys):
        return config.method_impl.score(inputs)


def score_site(config: CompressionConfig, *site: Tensor | int | None) -> Tensor:
    """What ``kvc::score_kv`` computes: the method's [batch, kv_heads, n] fp32 scores at one site."""
    inputs = site_inputs(config, *site)
    batch, kv_heads, n, _ = inputs.keys.shape
    if n <= config.method_impl.min_uncompressed_length:  # kept whole: no window to score with
        return inputs.keys.new_zeros(batch, kv_heads, n, dtype=torch.float32)
    with device_kernels(inputs.keys):
        return config.method_impl.score(inputs).float()


def compress_scored_layers(
    config: CompressionConfig, scores: list[Tensor], keys: list[Tensor], values: list[Tensor], attn_mask: Tensor | None
) -> list[CompressedKV]:
    """What ``kvc::compress_layers`` computes: every layer at once, from every layer's scores."""
    batch, _, n, _ = keys[0].shape
    valid = valid_keys_from_mask(attn_mask, batch, n, keys[0].device)
    with device_kernels(keys[0]):
        return compress_layers_jointly(config.method_impl, config.kept_length(n), scores, keys, values, valid)


@torch.library.custom_op("kvc::compress_kv", mutates_args=())
def compress_kv(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    layer_idx: int,
    n_layers: int,
    spec: str,
    output_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compress one layer's prefill cache: kept keys, kept values, their positions and KV heads.
    ``output_weight``: the layer's ``o_proj.weight``, passed only for methods that read it."""
    config = CompressionConfig.from_spec(spec)
    site = (query, keys, values, attn_mask, cos, sin, layer_idx, n_layers, output_weight)
    return tuple(compress_site(config, *site))


@compress_kv.register_fake
def _(query, keys, values, attn_mask, cos, sin, layer_idx: int, n_layers: int, spec: str, output_weight=None):
    batch, kv_heads, n, _ = keys.shape
    config = CompressionConfig.from_spec(spec)
    entries = compressed_shapes(config.method_impl, config.kept_length(n), batch, kv_heads, n, layer_idx, n_layers)
    return (
        keys.new_empty(*entries, keys.shape[-1]),
        values.new_empty(*entries, values.shape[-1]),
        keys.new_empty(entries, dtype=INDEX_DTYPE),
        keys.new_empty(entries, dtype=INDEX_DTYPE),
    )


@torch.library.custom_op("kvc::score_kv", mutates_args=())
def score_kv(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    attn_mask: Tensor | None,
    cos: Tensor | None,
    sin: Tensor | None,
    layer_idx: int,
    n_layers: int,
    spec: str,
) -> Tensor:
    """One layer's scores, [batch, kv_heads, n] fp32, for ``kvc::compress_layers``."""
    return score_site(CompressionConfig.from_spec(spec), query, keys, values, attn_mask, cos, sin, layer_idx, n_layers)


@score_kv.register_fake
def _(query, keys, values, attn_mask, cos, sin, layer_idx: int, n_layers: int, spec: str):
    return keys.new_empty(keys.shape[:3], dtype=torch.float32)


@torch.library.custom_op("kvc::compress_layers", mutates_args=())
def compress_layers(
    scores: list[Tensor], keys: list[Tensor], values: list[Tensor], attn_mask: Tensor | None, spec: str
) -> list[Tensor]:
    """Every layer's kept keys, values, positions and heads (4 tensors per layer, in layer order)."""
    compressed = compress_scored_layers(CompressionConfig.from_spec(spec), scores, keys, values, attn_mask)
    return [tensor for layer in compressed for tensor in layer]


@compress_layers.register_fake
def _(scores, keys, values, attn_mask, spec: str):
    ctx = torch.library.get_ctx()
    outputs = []
    for layer_keys, layer_values in zip(keys, values, strict=True):
        batch = layer_keys.shape[0]
        entries = ctx.new_dynamic_size()  # the layer's budget comes from the scores of all layers
        outputs += [
            layer_keys.new_empty(batch, 1, entries, layer_keys.shape[-1]),
            layer_values.new_empty(batch, 1, entries, layer_values.shape[-1]),
            layer_keys.new_empty(batch, 1, entries, dtype=INDEX_DTYPE),
            layer_keys.new_empty(batch, 1, entries, dtype=INDEX_DTYPE),
        ]
    return outputs


@torch.library.custom_op("kvc::prefill_entries", mutates_args=())
def prefill_entries(key_states: Tensor) -> tuple[Tensor, Tensor]:
    """Positions and KV heads of freshly cached prompt entries: two [batch, kv_heads, n] tensors."""
    return prefill_entries_aten(key_states)


def prefill_entries_aten(key_states: Tensor) -> tuple[Tensor, Tensor]:
    """``kvc::prefill_entries`` in aten ops (ONNX export decomposes the op into it)."""
    batch, kv_heads, n, _ = key_states.shape
    return dense_entries(batch, kv_heads, n, key_states.device)


@prefill_entries.register_fake
def _(key_states):
    batch, kv_heads, n, _ = key_states.shape
    return (
        key_states.new_empty(batch, kv_heads, n, dtype=INDEX_DTYPE),
        key_states.new_empty(batch, kv_heads, n, dtype=INDEX_DTYPE),
    )
