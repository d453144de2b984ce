"""``manifest.json``: what an engine directory holds, checked before anything is loaded.

The manifest records the format version, the model and its dimensions, the compression settings,
the cache budgets and capacity per layer, the programs with their shapes, the library versions the
engine was built with, and a SHA-256 of every file, so that a truncated or edited engine is
reported as such instead of failing inside a compiled program.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# 2: AOTInductor packages without constants, beside one weights file; 3: compression while decoding
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
# Per-layer state of the window layout (compression while decoding, LAQ's rollout) and of LAQ's
# prefill (the stage-1 cache, the full prompt entries, the buffer of recent queries).
WINDOW_STATE = ("keys", "values", "positions", "recent_queries")
LOOKAHEAD_PREFILL_STATE = ("keys", "values", "positions", "prompt_keys", "prompt_values", "recent_queries")
# Per-layer state of KQ-SVD engines besides the entries: the calibrated factors and the output
# projection folded with the value lift, the same for every prompt and step (no batch axis).
LOWRANK_STATE = ("key_down", "key_up", "value_down", "value_up", "output_fold")


class EngineError(RuntimeError):
    """A problem with an engine directory or a request to it; the message names the fix."""


@dataclass
class ProgramEntry:
    """One compiled program: its file and the prompt lengths it takes (prefill) or its capacity."""

    file: str
    min_length: int = 1
    max_length: int = 1


@dataclass
class Manifest:
    format_version: int
    target: str
    model: dict[str, Any]  # name, architecture, layers, kv_heads, head_dim, vocab_size, dtype
    compression: dict[str, Any]  # the CompressionConfig, as its spec
    device: str
    max_context: int
    max_new_tokens: int
    max_batch: int
    state_names: list[str]  # per layer, in program order
    packed: bool
    prompt_slots: list[int]  # per layer: slots reserved for prompt entries
    capacity: list[int]  # per layer: prompt_slots + the decoded tokens' entries
    budgets: dict[str, Any]  # entries kept per KV head per layer, at max_context and for short prompts
    prefill: list[ProgramEntry]
    decode: ProgramEntry
    eos_token_ids: list[int]
    pad_token_id: int
    versions: dict[str, str]
    tokenizer: str | None = None  # a folder, or None when the model came without one
    # Compression while decoding (window layout): the program of the steps that evict, and the
    # entries per KV head they bring a layer back to.
    decode_evict: ProgramEntry | None = None
    decode_target: int | None = None
    # LAQ: {"steps": pseudo tokens, "capacity": rollout slots, "rollout": file, "stage2": [ProgramEntry
    # fields per prompt range]}
    lookahead: dict[str, Any] | None = None
    # AOTInductor: {"file": weights file, "programs": {program file: {constant name: key in the file}}}
    weights: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256

    @property
    def stage2(self) -> list[ProgramEntry]:
        return [ProgramEntry(**entry) for entry in self.lookahead["stage2"]] if self.lookahead is not None else []

    @property
    def programs(self) -> list[ProgramEntry]:
        """Every program file: prefill, decode, then those of decode-time eviction or LAQ."""
        programs = [*self.prefill, self.decode]
        if self.decode_evict is not None:
            programs.append(self.decode_evict)
        if self.lookahead is not None:
            programs += [ProgramEntry(self.lookahead["rollout"]), *self.stage2]
        return programs

    def write(self, folder: Path) -> None:
        self.files = {str(path.relative_to(folder)): sha256(path) for path in sorted(folder.rglob("*"))
                      if path.is_file() and path.name != MANIFEST}
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path, verify: bool = True) -> Manifest:
        path = folder / MANIFEST
        if not folder.is_dir():
            raise EngineError(f"{folder} is not an engine directory (it does not exist); build one with kvc-build")
        if not path.is_file():
            raise EngineError(f"{folder} has no {MANIFEST}: it is not an engine directory or its build did not "
                              f"finish; rebuild it with kvc-build --out {folder} --force")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise EngineError(f"{path} is corrupted ({error}); rebuild the engine with kvc-build --force") from error
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise EngineError(f"{path} has engine format version {version!r}, and this kvc-compile reads version "
                              f"{FORMAT_VERSION}; rebuild the engine with this version's kvc-build")
        try:
            raw["prefill"] = [ProgramEntry(**entry) for entry in raw["prefill"]]
            raw["decode"] = ProgramEntry(**raw["decode"])
            if raw.get("decode_evict") is not None:
                raw["decode_evict"] = ProgramEntry(**raw["decode_evict"])
            manifest = cls(**raw)
        except (KeyError, TypeError) as error:
            raise EngineError(f"{path} is incomplete or corrupted ({error}); rebuild the engine with "
                              f"kvc-build --force") from error
        if verify:
            manifest.verify(folder)
        return manifest

    def verify(self, folder: Path) -> None:
        """Every listed file is present and unchanged."""
        for name, digest in self.files.items():
            path = folder / name
            if not path.is_file():
                raise EngineError(f"engine {folder} is incomplete: {name} is missing; rebuild it with "
                                  f"kvc-build --force")
            if sha256(path) != digest:
                raise EngineError(f"engine {folder} is corrupted: {name} does not match the SHA-256 in {MANIFEST}; "
                                  f"rebuild it with kvc-build --force")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["FORMAT_VERSION", "LOOKAHEAD_PREFILL_STATE", "MANIFEST", "WINDOW_STATE",
           "EngineError", "Manifest", "ProgramEntry", "sha256"]
