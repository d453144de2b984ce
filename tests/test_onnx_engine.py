"""ONNX engines (``--target onnx``): the graphs pass onnx.checker, the compression ops are
TensorRT-style plugin nodes, and ONNX Runtime keeps the tokens of the compiled path."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import tiny_model
from test_engine import engine_and_compiled_tokens, method_options, quiet_build

from kvc_compile.engine import Engine, EngineError
from kvc_compile.engine.manifest import MANIFEST
from kvc_compile.plugins.onnx import PLUGIN_DOMAIN, OnnxExportError, export_onnx, plugin_nodes

# One method per ONNX plugin: KvcCompressKV (dense with rotary tables, packed; without rotary
# tables: snapkv in test_engine.py's AOTInductor test), KvcPackedAttention (packed decode),
# KvcScoreKV + KvcCompressLayers (budgets across layers), KvcCompressKVWeighted (the output projection
# as an input: CriticalAdaKV, packed).
PLUGINS_USED = {
    "expected_attention": ({"KvcCompressKV"}, set()),
    "criticaladakv": ({"KvcCompressKVWeighted"}, {"KvcPackedAttention"}),
    "adakv": ({"KvcCompressKV"}, {"KvcPackedAttention"}),
    "lava": ({"KvcScoreKV", "KvcCompressLayers"}, {"KvcPackedAttention"}),
}


def onnx_files(engine_dir):
    manifest = json.loads((engine_dir / MANIFEST).read_text())
    prefill = [engine_dir / entry["file"] for entry in manifest["prefill"]]
    return prefill, engine_dir / manifest["decode"]["file"]


@pytest.mark.parametrize("method", sorted(PLUGINS_USED))
def test_onnx_engine_passes_the_checker_and_keeps_the_compiled_tokens(method, tmp_path):
    options = method_options(method)
    quiet_build(tiny_model("llama", attn_implementation="kvc"), options, tmp_path / "engine", target="onnx")
    prefill_files, decode_file = onnx_files(tmp_path / "engine")
    assert all(path.suffix == ".onnx" for path in [*prefill_files, decode_file])
    prefill_ops, decode_ops = PLUGINS_USED[method]
    compressing = onnx.load(str(prefill_files[-1]))  # the longest prompts' program compresses
    onnx.checker.check_model(compressing, full_check=True)
    assert {node.op_type for node in plugin_nodes(compressing)} == prefill_ops
    for node in plugin_nodes(compressing):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_version"] == b"1" and attributes["plugin_namespace"] == b"kvc"
    decode = onnx.load(str(decode_file))
    onnx.checker.check_model(decode, full_check=True)
    assert {node.op_type for node in plugin_nodes(decode)} == decode_ops
    assert not any(node.domain not in ("", PLUGIN_DOMAIN) for node in [*compressing.graph.node, *decode.graph.node])

    onnx_tokens, compiled_tokens = engine_and_compiled_tokens(tmp_path / "engine", options)
    assert onnx_tokens == compiled_tokens


def test_an_onnx_engine_of_another_dtype_is_refused_with_the_fix(tmp_path):
    quiet_build(tiny_model("llama", attn_implementation="kvc"), method_options("knorm"), tmp_path / "engine",
                target="onnx")
    manifest_path = tmp_path / "engine" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["dtype"] = "float16"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="float32 only: rebuild it with --dtype float32"):
        Engine.load(tmp_path / "engine")


def test_ops_without_a_plugin_node_are_named(tmp_path):
    class PushQuery(torch.nn.Module):  # a marker the kvc pass rewrites: never left in a built program
        def forward(self, buffer, key_states):
            return torch.ops.kvc.push_query(buffer, key_states)

    exported = torch.export.export(PushQuery(), (torch.randn(1, 2, 8, 4), torch.randn(1, 1, 1, 4)))
    with pytest.raises(OnnxExportError, match="kvc.push_query.default"):
        export_onnx(exported, tmp_path / "program.onnx")
