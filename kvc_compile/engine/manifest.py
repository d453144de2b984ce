"""``manifest.json``: what an engine directory holds, checked before anything is loaded.

The manifest records the format version, the model and its dimensions, the compression settings,
the cache budgets and capacity per layer, the programs with their shapes, the library versions the
engine was built with, and a SHA-256 of every file, so that a truncated or edited engine is
reported as such instead of failing inside a compiled program.

The hashes detect corruption and accidental edits, not an attacker: whoever can edit a file of the
engine can edit the manifest's hash of it too. Trust in an engine comes from where it came from
(loading one runs its code). What reading a manifest does guarantee: every value has the type and
range the runtime relies on, every path is relative and resolves (symlinks included) inside the
engine directory, and every file the runtime loads is listed in ``files`` and matches its hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

# 2: AOTInductor packages without constants, beside one weights file; 3: compression while decoding
# 4: shared weights, hashes; 5: decode reads the live prefix (mask length), its token slot given;
FORMAT_VERSION = 6  # 6: tuned decode programs, which hold their own weights
MANIFEST = "manifest.json"
# The ONNX programs' shared weights (kvc_compile.plugins.onnx.weights.WEIGHTS_FILE, which needs onnx).
ONNX_WEIGHTS_FILE = "weights.onnx.data"


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
    state_names: list[str]  # per layer, in program order: fields of kvc_compile.engine.state's records
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
    # Compression while decoding (rolling layout): the program of the steps that evict, and the
    # entries per KV head they bring a layer back to.
    decode_evict: ProgramEntry | None = None
    decode_target: int | None = None
    # LAQ: {"steps": pseudo tokens, "capacity": rollout slots, "rollout": file, "stage2": [ProgramEntry
    # fields per prompt range]}
    lookahead: dict[str, Any] | None = None
    # AOTInductor: the decode programs were compiled with max-autotune and frozen weights, which they
    # carry in their own library (they take nothing from the weights file).
    tuned_decode: bool = False
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

    @property
    def self_contained(self) -> list[str]:
        """The program files that hold their own weights: the tuned decode programs."""
        if not self.tuned_decode:
            return []
        return [self.decode.file, *([self.decode_evict.file] if self.decode_evict is not None else [])]

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
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise EngineError(f"{path} is corrupted ({error}); rebuild the engine with kvc-build --force") from error
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise EngineError(f"{path} has engine format version {version!r}, and this kvc-compile reads version "
                              f"{FORMAT_VERSION}; rebuild the engine with this version's kvc-build")
        manifest = _ManifestChecker(path, raw).manifest()
        manifest.check_paths(folder)
        if verify:
            manifest.verify(folder)
        return manifest

    def loaded_files(self, folder: Path) -> list[str]:
        """Every file the runtime reads besides the manifest, as paths relative to ``folder``: the
        programs, the shared weights file and every file in the tokenizer folder."""
        names = [entry.file for entry in self.programs]
        if self.weights is not None:
            names.append(self.weights["file"])
        if self.target == "onnx" and ONNX_WEIGHTS_FILE not in names and (folder / ONNX_WEIGHTS_FILE).exists():
            names.append(ONNX_WEIGHTS_FILE)  # ONNX Runtime reads it whatever the manifest says
        if self.tokenizer is not None:
            root = folder.resolve()
            names += [path.relative_to(root).as_posix() for path in sorted((root / self.tokenizer).rglob("*"))
                      if path.is_file()]
        return names

    def check_paths(self, folder: Path) -> None:
        """Every path the manifest names is relative and resolves inside ``folder``, and every file
        the runtime loads is listed in ``files`` (so its hash is checked before it is read)."""
        where = folder / MANIFEST
        named = [("files", name) for name in self.files]
        named += [("program file", entry.file) for entry in self.programs]
        if self.weights is not None:
            named.append(("weights.file", self.weights["file"]))
        if self.tokenizer is not None:
            named.append(("tokenizer", self.tokenizer))
        for key, name in named:
            _check_inside(folder, where, key, name)
        if self.tokenizer is not None and not (folder / self.tokenizer).is_dir():
            raise EngineError(f"{where}: 'tokenizer' names {self.tokenizer!r}, which is not a folder of the engine; "
                              f"rebuild the engine with kvc-build --force")
        for name in self.loaded_files(folder):
            _check_inside(folder, where, "tokenizer file", name)
            if name not in self.files:
                raise EngineError(f"{where}: {name} is loaded by the runtime but not listed in 'files', so its "
                                  f"SHA-256 cannot be checked; rebuild the engine with kvc-build --force")

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


def _check_inside(folder: Path, where: Path, key: str, name: str) -> None:
    """``name`` is a relative path that resolves (symlinks followed) inside ``folder``."""
    root = folder.resolve()
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() \
            or PureWindowsPath(name).drive:
        raise EngineError(f"{where}: {key} {name!r} is not a relative path inside the engine directory; rebuild the "
                          f"engine with kvc-build --force")
    resolved = (root / name).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise EngineError(f"{where}: {key} {name!r} resolves to {resolved}, outside the engine directory {root} "
                          f"(a '..' or a symlink); an engine only reads its own files: rebuild it with "
                          f"kvc-build --force")
    if resolved == root / MANIFEST:
        raise EngineError(f"{where}: {key} {name!r} names the manifest itself; rebuild the engine with "
                          f"kvc-build --force")


_SHA256 = re.compile(r"[0-9a-f]{64}")


class _ManifestChecker:
    """Builds a ``Manifest`` from its JSON, checking every key's type and range first, so that an
    edited or damaged manifest fails here with the key's name instead of deep inside the runtime."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def fail(self, key: str, expected: str, value: Any = None, *, show: bool = True) -> EngineError:
        got = f", got {_short(value)}" if show else ""
        return EngineError(f"{self.path}: {key!r} must be {expected}{got}; the manifest was edited or is corrupted: "
                           f"rebuild the engine with kvc-build --force")

    def get(self, key: str, optional: bool = False) -> Any:
        if key not in self.raw:
            if optional:
                return None
            raise EngineError(f"{self.path} has no {key!r}: the manifest is incomplete or was edited; rebuild the "
                              f"engine with kvc-build --force")
        return self.raw[key]

    def integer(self, key: str, value: Any, low: int = 0, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise self.fail(key, bound, value)
        return value

    def integers(self, key: str, value: Any, length: int | None, low: int = 0, high: int | None = None) -> list[int]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            count = "a list" if length is None else f"a list of {length} integers (one per layer)"
            raise self.fail(key, count, value)
        return [self.integer(f"{key}[{i}]", item, low, high) for i, item in enumerate(value)]

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string", value)
        return value

    def mapping(self, key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "a JSON object", value)
        return value

    def entry(self, key: str, value: Any) -> ProgramEntry:
        if not isinstance(value, dict) or not {"file"} <= value.keys() <= {"file", "min_length", "max_length"}:
            raise self.fail(key, "an object with 'file', 'min_length' and 'max_length'", value)
        entry = ProgramEntry(self.text(f"{key}.file", value["file"]),
                             self.integer(f"{key}.min_length", value.get("min_length", 1), 1),
                             self.integer(f"{key}.max_length", value.get("max_length", 1), 1))
        if entry.min_length > entry.max_length:
            raise self.fail(key, "a range with min_length <= max_length", value)
        return entry

    def prompt_ranges(self, key: str, value: Any, max_context: int) -> list[ProgramEntry]:
        """Programs by prompt length: contiguous ranges from 1 or 2 tokens up to ``max_context``."""
        if not isinstance(value, list) or not value:
            raise self.fail(key, "a non-empty list of programs", value)
        entries = [self.entry(f"{key}[{i}]", item) for i, item in enumerate(value)]
        gaps = [entry.min_length != before.max_length + 1 for before, entry in zip(entries, entries[1:], strict=False)]
        if entries[0].min_length > 2 or any(gaps) or entries[-1].max_length != max_context:
            ranges = [(entry.min_length, entry.max_length) for entry in entries]
            raise self.fail(key, f"contiguous prompt ranges from 1 (or 2) to max_context ({max_context}) tokens",
                            ranges)
        return entries

    def manifest(self) -> Manifest:
        known = {field.name for field in fields(Manifest)}
        unknown = sorted(set(self.raw) - known)
        if unknown:
            raise EngineError(f"{self.path} has unknown key {unknown[0]!r}: it was edited or written by another "
                              f"kvc-compile; rebuild the engine with kvc-build --force")
        get = self.get
        model = self.mapping("model", get("model"))
        for key in ("layers", "kv_heads", "vocab_size"):
            if key not in model:
                raise EngineError(f"{self.path} has no 'model.{key}': the manifest is incomplete or was edited; "
                                  f"rebuild the engine with kvc-build --force")
            self.integer(f"model.{key}", model[key], 1)
        self.text("model.dtype", model.get("dtype"))
        layers, vocab = model["layers"], model["vocab_size"]
        max_context = self.integer("max_context", get("max_context"), 1)
        max_new_tokens = self.integer("max_new_tokens", get("max_new_tokens"), 1)
        state_names = get("state_names")
        if not isinstance(state_names, list) or not state_names \
                or not all(isinstance(name, str) and name for name in state_names):
            raise self.fail("state_names", "a non-empty list of state names", state_names)
        packed = get("packed")
        if not isinstance(packed, bool):
            raise self.fail("packed", "true or false", packed)
        prompt_slots = self.integers("prompt_slots", get("prompt_slots"), layers)
        capacity = self.integers("capacity", get("capacity"), layers, 1)
        decode_evict = get("decode_evict", optional=True)
        decode_evict = None if decode_evict is None else self.entry("decode_evict", decode_evict)
        decode_target = get("decode_target", optional=True)
        if decode_evict is not None:
            # Rolling layout: every layer's buffers hold target_size + decoding_interval entries.
            if len(set(capacity)) != 1 or any(slots >= capacity[0] for slots in prompt_slots):
                raise self.fail("capacity", "one size for every layer, above each layer's prompt_slots",
                                {"capacity": capacity, "prompt_slots": prompt_slots}, show=True)
            self.integer("decode_target", decode_target, 1, capacity[0] - 1)
        else:
            if decode_target is not None:
                self.integer("decode_target", decode_target, 1)
            # Slot layout: room for the prompt's entries and every decoded token's.
            per_token = model["kv_heads"] if packed else 1
            for layer, (slots, size) in enumerate(zip(prompt_slots, capacity, strict=True)):
                if size < slots + max_new_tokens * per_token:
                    raise self.fail(f"capacity[{layer}]", f"at least prompt_slots[{layer}] + max_new_tokens"
                                    f"{' * kv_heads' if packed else ''} = {slots + max_new_tokens * per_token} "
                                    f"(were max_new_tokens or capacity edited?)", size)
        eos = self.integers("eos_token_ids", get("eos_token_ids"), None, 0, vocab - 1)
        pad = self.integer("pad_token_id", get("pad_token_id"), 0, vocab - 1)
        lookahead = get("lookahead", optional=True)
        prefill = self.prompt_ranges("prefill", get("prefill"), max_context)
        if lookahead is not None:
            self.mapping("lookahead", lookahead)
            if not {"steps", "capacity", "rollout", "stage2"} <= lookahead.keys():
                raise self.fail("lookahead", "an object with 'steps', 'capacity', 'rollout' and 'stage2'", lookahead)
            self.integer("lookahead.steps", lookahead["steps"], 1)
            self.integer("lookahead.capacity", lookahead["capacity"], 1)
            self.text("lookahead.rollout", lookahead["rollout"])
            self.prompt_ranges("lookahead.stage2", lookahead["stage2"], max_context)
        tuned_decode = get("tuned_decode", optional=True)
        tuned_decode = False if tuned_decode is None else tuned_decode
        if not isinstance(tuned_decode, bool) or (tuned_decode and get("target") != "aoti"):
            raise self.fail("tuned_decode", "true or false, and true only for an 'aoti' engine", tuned_decode)
        weights = get("weights", optional=True)
        if weights is not None:
            self.mapping("weights", weights)
            self.text("weights.file", weights.get("file"))
        tokenizer = get("tokenizer", optional=True)
        if tokenizer is not None:
            self.text("tokenizer", tokenizer)
        files = self.mapping("files", get("files"))
        for name, digest in files.items():
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise self.fail(f"files[{name!r}]", "a SHA-256 as 64 lowercase hex digits", digest)
        versions = self.mapping("versions", get("versions"))
        manifest = Manifest(
            format_version=get("format_version"), target=self.text("target", get("target")), model=model,
            compression=self.mapping("compression", get("compression")), device=self.text("device", get("device")),
            max_context=max_context, max_new_tokens=max_new_tokens,
            max_batch=self.integer("max_batch", get("max_batch"), 1), state_names=state_names, packed=packed,
            prompt_slots=prompt_slots, capacity=capacity, budgets=self.mapping("budgets", get("budgets")),
            prefill=prefill, decode=self.entry("decode", get("decode")), eos_token_ids=eos, pad_token_id=pad,
            versions=versions, tokenizer=tokenizer, decode_evict=decode_evict, decode_target=decode_target,
            lookahead=lookahead, tuned_decode=tuned_decode, weights=weights, files=files,
        )
        self.check_weights_map(manifest)
        return manifest

    def check_weights_map(self, manifest: Manifest) -> None:
        """Programs that take their constants from the shared weights file (all but the tuned decode
        programs) each have a map of them."""
        weights = manifest.weights
        if weights is None or "programs" not in weights:
            if weights is not None and manifest.target != "onnx":
                raise self.fail("weights.programs", "a map of each program's constants", None, show=False)
            return
        per_program = self.mapping("weights.programs", weights["programs"])
        for entry in manifest.programs:
            if entry.file in manifest.self_contained:
                continue
            names = per_program.get(entry.file)
            if not isinstance(names, dict) or not all(isinstance(key, str) and isinstance(value, str)
                                                      for key, value in names.items()):
                raise self.fail(f"weights.programs[{entry.file!r}]", "a map of constant names to stored tensor names",
                                names)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["FORMAT_VERSION", "MANIFEST", "EngineError", "Manifest", "ProgramEntry", "sha256"]
