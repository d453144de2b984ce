"""Kernels and export targets behind the ``kvc::`` ops.

``triton/``: GPU kernels (runnable on the CPU under ``TRITON_INTERPRET=1`` for testing), each tested
against a pure-PyTorch reference; the ops dispatch to them by device. ``onnx/`` and ``tensorrt/``:
what an engine's ONNX and TensorRT targets need to carry the ops.
"""


class TargetUnavailableError(RuntimeError):
    """An export target whose libraries or hardware are missing here; the message names them."""
