"""ONNX engine programs in ONNX Runtime: the plugin nodes run as onnxruntime-extensions Python ops.

onnxruntime-extensions serves Python ops from its own domain, so a session's copy of the graph has
its plugin nodes moved from ``trt.plugins`` to that domain (the file on disk keeps TensorRT's
naming). Each op converts its inputs to torch tensors and calls the same ``kvc::`` op the other
targets run, so ONNX Runtime keeps the same entries. Python ops are registered for float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime_extensions import PyCustomOpDef, default_opset_domain, get_library_path, onnx_op
from torch import Tensor

from kvc_compile.plugins.onnx import PLUGIN_DOMAIN, PLUGINS
from kvc_compile.plugins.onnx.weights import SharedOnnxWeightsReader

kvc = torch.ops.kvc
F32, BOOL, I32, I64, STR = (PyCustomOpDef.dt_float, PyCustomOpDef.dt_bool, PyCustomOpDef.dt_int32,
                            PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string)
LOOKUP_ATTRS = {"plugin_version": STR, "plugin_namespace": STR}
LAYER_ATTRS = {"layer_idx": I64, "n_layers": I64, "spec": STR, **LOOKUP_ATTRS}
SCORE_INPUTS = [F32, F32, F32, BOOL, F32, F32]


def _tensor(array: np.ndarray) -> Tensor | None:
    """An input as a torch tensor; an empty one stands for an absent optional input."""
    return torch.from_numpy(np.ascontiguousarray(array)) if array.size else None


def _arrays(tensors) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in tensors)


@onnx_op(op_type=PLUGINS["compress_kv"].name, inputs=SCORE_INPUTS, outputs=[F32, F32, I32, I32], attrs=LAYER_ATTRS)
def _compress_kv(query, keys, values, mask, cos, sin, layer_idx, n_layers, spec, **_lookup):
    return _arrays(kvc.compress_kv(*map(_tensor, (query, keys, values, mask, cos, sin)), layer_idx, n_layers, spec))


@onnx_op(op_type=PLUGINS["compress_kv_weighted"].name, inputs=[*SCORE_INPUTS, F32], outputs=[F32, F32, I32, I32],
         attrs=LAYER_ATTRS)
def _compress_kv_weighted(query, keys, values, mask, cos, sin, output_weight, layer_idx, n_layers, spec, **_lookup):
    site = map(_tensor, (query, keys, values, mask, cos, sin))
    return _arrays(kvc.compress_kv(*site, layer_idx, n_layers, spec, _tensor(output_weight)))


@onnx_op(op_type=PLUGINS["score_kv"].name, inputs=SCORE_INPUTS, outputs=[F32], attrs=LAYER_ATTRS)
def _score_kv(query, keys, values, mask, cos, sin, layer_idx, n_layers, spec, **_lookup):
    return kvc.score_kv(*map(_tensor, (query, keys, values, mask, cos, sin)), layer_idx, n_layers, spec).numpy()


@onnx_op(op_type=PLUGINS["packed_attention"].name, inputs=[F32, F32, F32, I32], outputs=[F32],
         attrs={"kv_heads": I64, "scaling": PyCustomOpDef.dt_float, **LOOKUP_ATTRS})
def _packed_attention(query, keys, values, heads, kv_heads, scaling, **_lookup):
    return kvc.packed_attention(*map(_tensor, (query, keys, values, heads)), kv_heads, scaling).numpy()


@onnx_op(op_type=PLUGINS["compress_decode"].name, inputs=[F32, F32, F32, I32, BOOL], outputs=[F32, F32, I32],
         attrs=LAYER_ATTRS)
def _compress_decode(recent_queries, keys, values, positions, mask, layer_idx, n_layers, spec, **_lookup):
    return _arrays(kvc.compress_decode(*map(_tensor, (recent_queries, keys, values, positions, mask)), layer_idx,
                                       n_layers, spec))


@onnx_op(op_type=PLUGINS["compress_decode_rotary"].name, inputs=[F32, F32, F32, I32, BOOL, F32, F32, F32],
         outputs=[F32, F32, I32], attrs=LAYER_ATTRS)
def _compress_decode_rotary(recent_queries, keys, values, positions, mask, cos, sin, inv_freq, layer_idx, n_layers,
                            spec, **_lookup):
    inputs = map(_tensor, (recent_queries, keys, values, positions, mask, cos, sin, inv_freq))
    return _arrays(kvc.compress_decode_rotary(*inputs, layer_idx, n_layers, spec))


@onnx_op(op_type=PLUGINS["lookahead_stage2"].name, inputs=[F32, F32, F32, I64, BOOL], outputs=[F32, F32, I32],
         attrs={"spec": STR, **LOOKUP_ATTRS})
def _lookahead_stage2(keys, values, recent_queries, prompt_mask, pseudo_valid, spec, **_lookup):
    return _arrays(kvc.lookahead_stage2(*map(_tensor, (keys, values, recent_queries, prompt_mask, pseudo_valid)),
                                        spec))


_COMPRESS_LAYERS: dict[int, str] = {}


def _compress_layers_op(n_layers: int) -> str:
    """Python ops have a fixed arity, so KvcCompressLayers gets one registration per layer count."""
    if n_layers not in _COMPRESS_LAYERS:
        name = f"{PLUGINS['compress_layers'].name}{n_layers}"

        def compress_layers(*arrays, spec, **_lookup):
            scores, keys, values = (list(map(_tensor, arrays[i * n_layers:(i + 1) * n_layers])) for i in range(3))
            return _arrays(kvc.compress_layers(scores, keys, values, _tensor(arrays[-1]), spec))

        onnx_op(op_type=name, inputs=[F32] * (3 * n_layers) + [BOOL], outputs=[F32, F32, I32, I32] * n_layers,
                attrs={"spec": STR, **LOOKUP_ATTRS})(compress_layers)
        _COMPRESS_LAYERS[n_layers] = name
    return _COMPRESS_LAYERS[n_layers]


def _for_python_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move the plugin nodes to onnxruntime-extensions' domain (in this copy of the graph only)."""
    contrib = default_opset_domain()
    for node in model.graph.node:
        if node.domain != PLUGIN_DOMAIN:
            continue
        node.domain = contrib
        if node.op_type == PLUGINS["compress_layers"].name:
            node.op_type = _compress_layers_op(len(node.output) // 4)
    for opset in model.opset_import:
        if opset.domain == PLUGIN_DOMAIN:
            opset.domain = contrib
    return model


class OnnxProgram:
    """An ONNX engine program called like the other targets' programs, with torch tensors.

    ``arg_names`` name the positional arguments as the graph's inputs. ``written`` lists the
    arguments that are cache buffers: the graph returns them updated after the logits, in this
    order, and they are written back in place, as the in-place programs of the other targets do.
    """

    def __init__(self, path: str | Path, arg_names: Sequence[str], written: Sequence[int] | None = None,
                 weights: SharedOnnxWeightsReader | None = None) -> None:
        path = Path(path)
        # Registers any op it needs: before the library is.
        model = _for_python_ops(onnx.load(str(path), load_external_data=False))
        options = ort.SessionOptions()
        options.register_custom_ops_library(get_library_path())
        # The weights every program of the engine shares, memory-mapped once (see weights.py).
        names, values = (weights or SharedOnnxWeightsReader(path.parent)).initializers(model)
        if names:
            options.add_external_initializers(names, values)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.arg_names = list(arg_names)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.written = written
        # A graph that does not match the engine's manifest fails here, not at its first call.
        unknown = [name for name in self.inputs if name not in self.arg_names]
        if unknown:
            raise ValueError(f"{path.name} takes inputs {unknown} that this engine's runtime does not pass "
                             f"(it passes {self.arg_names}); rebuild the engine with kvc-build --force")
        outputs = len(self.session.get_outputs())
        if written is not None and outputs != 1 + len(written):
            raise ValueError(f"{path.name} returns {outputs} outputs, and this engine's runtime expects the logits "
                             f"and {len(written)} updated buffers; rebuild the engine with kvc-build --force")

    def __call__(self, *args: Tensor):
        given = dict(zip(self.arg_names, args, strict=True))
        outputs = self.session.run(None, {name: given[name].cpu().numpy() for name in self.inputs})
        outputs = [torch.from_numpy(array) for array in outputs]
        if self.written is None:
            return tuple(outputs)
        for index, updated in zip(self.written, outputs[1:], strict=True):
            args[index].copy_(updated)
        return outputs[0]


__all__ = ["OnnxProgram"]
