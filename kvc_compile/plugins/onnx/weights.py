"""One copy of the weights for every ONNX program of an engine (ONNX external data).

Each exported graph carries its own copy of the model's initializers. The build moves them into one
file, ``weights.onnx.data``, beside the graphs: an initializer whose bytes are already stored points
at them (ONNX external data: location, offset, length), so the prefill, decode and other programs
share one copy on disk. At load, the file is memory-mapped once and every session is handed the same
arrays (``SessionOptions.add_external_initializers``), so they share one copy in memory too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import set_external_data

WEIGHTS_FILE = "weights.onnx.data"
MIN_BYTES = 1024  # smaller constants stay inside their graph
ALIGN = 64  # offsets of stored tensors, for aligned memory-mapped reads


class SharedOnnxWeights:
    """Moves the initializers of each program written into ``folder`` into ``weights.onnx.data``, once."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / WEIGHTS_FILE
        self.stored: dict[str, tuple[int, int]] = {}  # SHA-256 of the bytes -> (offset, length)
        self.size = 0

    def externalize(self, model_path: Path) -> None:
        """Rewrite the graph at ``model_path`` so its large initializers point into the shared file."""
        model_path = Path(model_path)
        model = onnx.load(str(model_path))  # with any external data the exporter wrote
        with self.path.open("ab") as data:
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < MIN_BYTES:
                    continue
                raw = tensor.raw_data
                digest = hashlib.sha256(raw).hexdigest()
                if digest not in self.stored:
                    padding = -self.size % ALIGN
                    data.write(b"\0" * padding + raw)
                    self.stored[digest] = (self.size + padding, len(raw))
                    self.size += padding + len(raw)
                offset, length = self.stored[digest]
                set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
        exporter_data = model_path.with_name(model_path.name + ".data")
        if exporter_data.exists():
            exporter_data.unlink()
        onnx.save(model, str(model_path))


class SharedOnnxWeightsReader:
    """``weights.onnx.data`` memory-mapped once; the arrays of each program's external initializers."""

    def __init__(self, folder: Path) -> None:
        path = Path(folder) / WEIGHTS_FILE
        self.data = np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None
        self.arrays: dict[tuple, object] = {}  # (offset, length, dtype, dims) -> OrtValue

    def initializers(self, model: onnx.ModelProto) -> tuple[list[str], list]:
        """Names and OrtValues of ``model``'s initializers stored in the shared file."""
        import onnxruntime as ort

        names, values = [], []
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            if info.get("location") != WEIGHTS_FILE or self.data is None:
                raise ValueError(f"initializer {tensor.name} is stored in {info.get('location')!r}, not in "
                                 f"{WEIGHTS_FILE}; rebuild the engine with kvc-build --force")
            offset, length = int(info["offset"]), int(info["length"])
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            key = (offset, length, dtype.str, tuple(tensor.dims))
            if key not in self.arrays:
                array = self.data[offset:offset + length].view(dtype).reshape(tuple(tensor.dims))
                self.arrays[key] = ort.OrtValue.ortvalue_from_numpy(array)
            names.append(tensor.name)
            values.append(self.arrays[key])
        return names, values


__all__ = ["WEIGHTS_FILE", "SharedOnnxWeights", "SharedOnnxWeightsReader"]
