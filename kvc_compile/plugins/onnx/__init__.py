"""ONNX export of engine programs, with the compression ops as TensorRT-style plugin nodes.

Every ``kvc::`` op left in an exported program becomes one node of the custom domain
``trt.plugins`` whose op type is the plugin's name (``KvcCompressKV``, ...) and whose attributes
carry ``plugin_version`` and ``plugin_namespace`` (``"kvc"``): TensorRT's ONNX parser looks up
nodes it has no importer for in the plugin registry by exactly these three, and passes the other
attributes to the plugin as fields. The schemas below are registered with ``onnx`` so the graphs
pass ``onnx.checker``; ``kvc_compile.plugins.onnx.runtime`` runs them in ONNX Runtime.

Absent optional tensors (no rotary tables for a method that does not need them, no mask) become
empty tensors, so each plugin has a fixed number of inputs.

The bookkeeping ops of compression while decoding (``shift_in``, ``last_queries``,
``append_positions_at``) are plain tensor edits, and KQ-SVD's projections are matrix products
with calibrated factors: they are decomposed into aten ops before export, so they become standard
ONNX nodes (Concat, Slice, Pad, Range, MatMul, constants) that any runtime runs natively.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

import kvc_compile.ops  # noqa: F401  (registers every kvc:: op)
from kvc_compile.compression.lowrank import FACTOR_NAMES, fold_heads, project_entries
from kvc_compile.config import CompressionConfig
from kvc_compile.ops.compress import prefill_entries_aten
from kvc_compile.ops.decode import append_positions_at_aten, last_queries_aten, shift_in_aten
from kvc_compile.ops.lowrank import lowrank_lift_aten
from kvc_compile.plugins.onnx.weights import SharedOnnxWeights

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAMESPACE = "kvc"
PLUGIN_VERSION = "1"
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

kvc = torch.ops.kvc


@dataclass(frozen=True)
class Plugin:
    """One compression op as a plugin: its ONNX node's inputs, outputs and attributes."""

    name: str
    doc: str
    inputs: tuple[tuple[str, str], ...]  # (name, type constraint)
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, OpSchema.AttrType], ...]
    variadic: bool = False  # one list input per layer (inputs and outputs repeat per layer)

    def fixed_arity(self, n_layers: int) -> Plugin:
        """KvcCompressLayers with its inputs and outputs spelt out for ``n_layers``: the exporter
        gives a node as many outputs as its schema lists."""
        inputs = tuple((f"{kind}_{i}", "T" if kind != "scores" else "F")
                       for kind in ("scores", "keys", "values") for i in range(n_layers)) + (("attn_mask", "B"),)
        outputs = tuple((f"{kind}_{i}", "I" if kind in ("positions", "heads") else "T")
                        for i in range(n_layers) for kind in ("keys", "values", "positions", "heads"))
        return Plugin(self.name, self.doc, inputs, outputs, self.attributes)

    def schema(self) -> OpSchema:
        option = OpSchema.FormalParameterOption.Variadic if self.variadic else OpSchema.FormalParameterOption.Single
        params = [OpSchema.FormalParameter(name, type_str, "", param_option=option, is_homogeneous=not self.variadic)
                  for name, type_str in self.inputs]
        outputs = [OpSchema.FormalParameter(name, type_str, "", param_option=option, is_homogeneous=not self.variadic)
                   for name, type_str in self.outputs]
        attributes = [OpSchema.Attribute(name, kind, "") for name, kind in self.attributes]
        attributes += [OpSchema.Attribute(name, OpSchema.AttrType.STRING, "TensorRT plugin lookup")
                       for name in ("plugin_version", "plugin_namespace")]
        constraints = [("T", FLOATS, "model dtype"), ("B", ["tensor(bool)"], "attention mask"),
                       ("I", ["tensor(int32)"], "positions / KV heads"), ("F", ["tensor(float)"], "scores"),
                       ("M", ["tensor(int64)"], "prompt attention mask")]
        if self.variadic:
            constraints = [("V", [*FLOATS, "tensor(bool)", "tensor(int32)"], "any")]
        return OpSchema(self.name, PLUGIN_DOMAIN, 1, doc=self.doc, inputs=params, outputs=outputs,
                        type_constraints=constraints, attributes=attributes)


_LAYER_ATTRS = (("layer_idx", OpSchema.AttrType.INT), ("n_layers", OpSchema.AttrType.INT),
                ("spec", OpSchema.AttrType.STRING))
_SCORE_INPUTS = (("query", "T"), ("keys", "T"), ("values", "T"), ("attn_mask", "B"), ("cos", "T"), ("sin", "T"))
PLUGINS = {
    "compress_kv": Plugin(
        "KvcCompressKV", "kvc::compress_kv: score one layer's prefill cache and keep its budget.",
        _SCORE_INPUTS, (("kept_keys", "T"), ("kept_values", "T"), ("positions", "I"), ("heads", "I")), _LAYER_ATTRS),
    "compress_kv_weighted": Plugin(
        "KvcCompressKVWeighted", "kvc::compress_kv for methods that weigh entries by the output projection "
        "(CriticalKV): KvcCompressKV's inputs and the layer's o_proj weight [hidden, q_heads * head_dim].",
        (*_SCORE_INPUTS, ("output_weight", "T")),
        (("kept_keys", "T"), ("kept_values", "T"), ("positions", "I"), ("heads", "I")), _LAYER_ATTRS),
    "score_kv": Plugin(
        "KvcScoreKV", "kvc::score_kv: one layer's scores [batch, kv_heads, n], for KvcCompressLayers.",
        _SCORE_INPUTS, (("scores", "F"),), _LAYER_ATTRS),
    "compress_layers": Plugin(
        "KvcCompressLayers", "kvc::compress_layers: budgets across layers; inputs are L scores, L keys, L values "
        "and the mask, outputs 4 tensors per layer (keys, values, positions, heads).",
        (("inputs", "V"),), (("outputs", "V"),), (("spec", OpSchema.AttrType.STRING),), variadic=True),
    "compress_decode": Plugin(
        "KvcCompressDecode", "kvc::compress_decode: bring one layer back to its target size while decoding, "
        "scored with the buffer of recent queries.",
        (("recent_queries", "T"), ("keys", "T"), ("values", "T"), ("positions", "I"), ("attn_mask", "B")),
        (("kept_keys", "T"), ("kept_values", "T"), ("kept_positions", "I")), _LAYER_ATTRS),
    "compress_decode_rotary": Plugin(
        "KvcCompressDecodeRotary", "kvc::compress_decode_rotary: KvcCompressDecode for scorers of pre-RoPE "
        "queries; cos/sin are the step's rotary tables and inv_freq the model's rotary frequencies.",
        (("recent_queries", "T"), ("keys", "T"), ("values", "T"), ("positions", "I"), ("attn_mask", "B"),
         ("cos", "T"), ("sin", "T"), ("inv_freq", "F")),
        (("kept_keys", "T"), ("kept_values", "T"), ("kept_positions", "I")), _LAYER_ATTRS),
    "lookahead_stage2": Plugin(
        "KvcLookaheadStage2", "kvc::lookahead_stage2: LAQ's second stage, one layer's full prompt re-scored by "
        "its buffered prompt and pseudo-token queries.",
        (("prompt_keys", "T"), ("prompt_values", "T"), ("recent_queries", "T"), ("prompt_mask", "M"),
         ("pseudo_valid", "B")),
        (("kept_keys", "T"), ("kept_values", "T"), ("kept_positions", "I")), (("spec", OpSchema.AttrType.STRING),)),
    "packed_attention": Plugin(
        "KvcPackedAttention", "kvc::packed_attention: decode attention over a packed (per-head budget) layer.",
        (("query", "T"), ("keys", "T"), ("values", "T"), ("heads", "I")), (("output", "T"),),
        (("kv_heads", OpSchema.AttrType.INT), ("scaling", OpSchema.AttrType.FLOAT))),
}


def register_schemas(plugins=None) -> None:
    """Make the plugin nodes known to ``onnx`` (shape inference, ``onnx.checker``), replacing any
    schema of the same name."""
    for plugin in plugins or PLUGINS.values():
        if onnx.defs.has(plugin.name, PLUGIN_DOMAIN):
            onnx.defs.deregister_schema(plugin.name, 1, PLUGIN_DOMAIN)
        onnx.defs.register_schema(plugin.schema())


@contextmanager
def _layer_count(n_layers: int) -> Iterator[None]:
    """Export with KvcCompressLayers' fixed-arity schema for ``n_layers``; check with the variadic one."""
    register_schemas([PLUGINS["compress_layers"].fixed_arity(n_layers)])
    try:
        yield
    finally:
        register_schemas([PLUGINS["compress_layers"]])


PLUGIN_OPSET = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)  # ops are looked up (by schema) when called


def _or_empty(tensor, like):
    """An absent optional input as an empty tensor of ``like``'s type (plugins take fixed inputs)."""
    return tensor if tensor is not None else op.CastLike(op.Constant(value_floats=[]), like)


def _mask_or_empty(attn_mask):
    return attn_mask if attn_mask is not None else op.Cast(op.Constant(value_floats=[]), to=onnx.TensorProto.BOOL)


def _score_inputs(query, keys, values, attn_mask, cos, sin) -> tuple:
    """The six inputs of KvcCompressKV and KvcScoreKV."""
    return query, keys, values, _mask_or_empty(attn_mask), _or_empty(cos, query), _or_empty(sin, query)


def _lookup() -> dict[str, str]:
    return {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}


def _compress_kv(query, keys, values, attn_mask, cos, sin, layer_idx: int, n_layers: int, spec: str,
                 output_weight=None):
    inputs = _score_inputs(query, keys, values, attn_mask, cos, sin)
    if output_weight is not None:  # a separate node type, so engines built before it keep their schema
        return PLUGIN_OPSET.KvcCompressKVWeighted(*inputs, output_weight, layer_idx=layer_idx, n_layers=n_layers,
                                                  spec=spec, **_lookup())
    return PLUGIN_OPSET.KvcCompressKV(*inputs, layer_idx=layer_idx, n_layers=n_layers, spec=spec, **_lookup())


def _score_kv(query, keys, values, attn_mask, cos, sin, layer_idx: int, n_layers: int, spec: str):
    return PLUGIN_OPSET.KvcScoreKV(*_score_inputs(query, keys, values, attn_mask, cos, sin),
                                   layer_idx=layer_idx, n_layers=n_layers, spec=spec, **_lookup())


def _compress_layers(scores, keys, values, attn_mask, spec: str):
    outputs = PLUGIN_OPSET.KvcCompressLayers(*scores, *keys, *values, _mask_or_empty(attn_mask), spec=spec,
                                             **_lookup())
    # The op returns a list of tensors, which the exporter reads back as an ONNX sequence.
    return op.SequenceConstruct(*outputs)


def _packed_attention(query, keys, values, heads, kv_heads: int, scaling: float):
    return PLUGIN_OPSET.KvcPackedAttention(query, keys, values, heads, kv_heads=kv_heads, scaling=scaling,
                                           **_lookup())


def _compress_decode(recent_queries, keys, values, positions, attn_mask, layer_idx: int, n_layers: int, spec: str):
    return PLUGIN_OPSET.KvcCompressDecode(recent_queries, keys, values, positions, _mask_or_empty(attn_mask),
                                          layer_idx=layer_idx, n_layers=n_layers, spec=spec, **_lookup())


def _compress_decode_rotary(recent_queries, keys, values, positions, attn_mask, cos, sin, inv_freq, layer_idx: int,
                            n_layers: int, spec: str):
    return PLUGIN_OPSET.KvcCompressDecodeRotary(recent_queries, keys, values, positions, _mask_or_empty(attn_mask),
                                                cos, sin, inv_freq, layer_idx=layer_idx, n_layers=n_layers, spec=spec,
                                                **_lookup())


def _lookahead_stage2(keys, values, recent_queries, prompt_mask, pseudo_valid, spec: str):
    return PLUGIN_OPSET.KvcLookaheadStage2(keys, values, recent_queries, prompt_mask, pseudo_valid, spec=spec,
                                           **_lookup())


def _calibrated_factors(like, spec: str, layer_idx: int):
    """KQ-SVD factors as constants of the graph, read from the projections file at export."""
    projections = CompressionConfig.from_spec(spec).projections
    return tuple(op.Constant(value=onnx.numpy_helper.from_array(
        getattr(projections, name)[layer_idx].to(torch.float32).numpy(), name=f"{name}_{layer_idx}"))
        for name in FACTOR_NAMES)


def translation_table() -> dict:
    return {
        kvc.calibrated_factors.default: _calibrated_factors,
        kvc.compress_kv.default: _compress_kv,
        kvc.score_kv.default: _score_kv,
        kvc.compress_layers.default: _compress_layers,
        kvc.packed_attention.default: _packed_attention,
        kvc.compress_decode.default: _compress_decode,
        kvc.compress_decode_rotary.default: _compress_decode_rotary,
        kvc.lookahead_stage2.default: _lookahead_stage2,
    }


# Ops that are plain tensor edits or matrix products, exported as their aten forms.
DECOMPOSED = {
    kvc.prefill_entries.default: prefill_entries_aten,  # an uncompressed prompt's positions and heads
    kvc.shift_in.default: shift_in_aten,
    kvc.last_queries.default: last_queries_aten,
    kvc.append_positions_at.default: append_positions_at_aten,
    # KQ-SVD: the projections are matrix products (the factors are constants: ``_calibrated_factors``).
    kvc.lowrank_project.default: project_entries,
    kvc.lowrank_lift.default: lowrank_lift_aten,
    kvc.fold_output_projection.default: fold_heads,
}


class OnnxExportError(RuntimeError):
    pass


def export_onnx(exported: torch.export.ExportedProgram, path: Path, weights: SharedOnnxWeights | None = None) -> Path:
    """Write ``exported`` as an ONNX model at ``path`` and check it with ``onnx.checker``; with
    ``weights``, its initializers go to the file the engine's programs share."""
    table = translation_table()
    if any(node.target in DECOMPOSED for node in exported.graph.nodes):
        exported = exported.run_decompositions(DECOMPOSED)
    remaining = {str(node.target) for node in exported.graph.nodes
                 if node.op == "call_function" and str(node.target).startswith("kvc.") and node.target not in table}
    if remaining:
        raise OnnxExportError(f"the ops {sorted(remaining)} have no ONNX plugin node; build with --target aoti")
    register_schemas()
    with _layer_count(_n_layers(exported)):
        program = torch.onnx.export(exported, dynamo=True, custom_translation_table=table,
                                    verbose=False, optimize=True)
    path = Path(path)
    program.save(str(path))
    if weights is not None:
        weights.externalize(path)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _n_layers(exported: torch.export.ExportedProgram) -> int:
    """The layers a KvcCompressLayers node of this program spans (0: it has none)."""
    return next((len(node.args[1]) for node in exported.graph.nodes if node.target == kvc.compress_layers.default), 0)


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.domain == PLUGIN_DOMAIN]


__all__ = ["PLUGINS", "PLUGIN_DOMAIN", "PLUGIN_NAMESPACE", "OnnxExportError", "export_onnx", "plugin_nodes",
           "register_schemas", "translation_table"]
