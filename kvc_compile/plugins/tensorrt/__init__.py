"""TensorRT target: where TensorRT and a GPU are missing, the build refuses with what is missing.

The ONNX graphs of ``--target onnx`` already name their compression nodes as TensorRT plugins
(``kvc_compile.plugins.onnx``); the plugins themselves (TensorRT's Python plugin API over the
Triton kernels) are not written yet, so even with TensorRT present the target refuses and says so.
"""

from __future__ import annotations

import importlib.util

import torch

from kvc_compile.plugins import TargetUnavailableError


def require_tensorrt() -> None:
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt Python package (pip install tensorrt)")
    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU")
    if missing:
        raise TargetUnavailableError(
            f"--target tensorrt needs {' and '.join(missing)}, which this machine lacks; build with --target aoti "
            f"instead, or --target onnx for the ONNX graphs TensorRT would parse")
    raise TargetUnavailableError(
        "--target tensorrt: the TensorRT plugins for the compression ops are not implemented in this version; build "
        "with --target aoti, or --target onnx for the ONNX graphs with the plugin nodes")


__all__ = ["require_tensorrt"]
