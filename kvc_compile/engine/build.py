"""``kvc_compile.build``: export the prefill and decode programs, apply the kvc pass, compile, save.

1. ``torch.export`` traces ``PrefillProgram`` (the unmodified model on a ``CompressedCache``) to an
   aten graph with a dynamic batch and prompt length; the ``PassManager`` inserts compression after
   each attention; the rewritten graph is exported again so shapes and guards are re-derived.
   Prompts no longer than the method's observation window are left uncompressed by the method, a
   different program, so they get their own prefill program.
2. ``DecodeProgram`` is exported with the cache at its fixed capacity (the prompt slots of the
   longest prompt plus ``max_new_tokens``): shape-static, state updated in place.
3. Each program is compiled with AOTInductor into a ``.pt2`` package (target ``aoti``) or saved as
   a serialized ``ExportedProgram`` (target ``exported``: no C++ compile, for tests and debugging);
   target ``onnx`` writes ONNX graphs with the compression as custom-domain nodes. The programs
   share one copy of the weights (``weights.safetensors``, or ``weights.onnx.data`` for ONNX),
   except tuned decode programs (option ``tune_decode``, AOTInductor), which carry their own packed
   copy (``_save_program``).
4. The tokenizer and ``manifest.json`` go beside them.

Everything is checked before the model is touched, and the engine is written into a temporary
folder beside ``out`` that replaces ``out`` only once it is complete: a failed or interrupted build
leaves what was at ``out`` as it was. ``force`` replaces an existing engine directory, never
another folder (see ``check_output_dir``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import Tensor

from kvc_compile.backend.tuning import DECODE_TUNING
from kvc_compile.cache import sliding_windows
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.compression.layout import INDEX_DTYPE
from kvc_compile.config import CompressionConfig
from kvc_compile.engine.manifest import FORMAT_VERSION, MANIFEST, EngineError, Manifest, ProgramEntry
from kvc_compile.engine.programs import (
    DecodeProgram,
    LookaheadStage2Program,
    PrefillProgram,
    StateLayout,
    without_weights,
)
from kvc_compile.engine.state import RollingState, SlotState, Stage2Input, Stage2Output, flatten, unflatten
from kvc_compile.files import default_mode
from kvc_compile.models import attention_head_dim
from kvc_compile.ops.compress import ShortPromptWarning
from kvc_compile.passes import PassManager
from kvc_compile.plugins import TargetUnavailableError
from kvc_compile.version import __version__

TARGETS = ("aoti", "exported", "onnx", "tensorrt")
EXAMPLE_BATCH = 2  # an example batch of 1 would specialise the batch dimension


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: Manifest
    seconds: float
    nbytes: int  # the engine directory's size


def check_output_dir(out: str | Path, force: bool, protected: Sequence[str | Path] = ()) -> Path:
    """Where the engine will go: ``out`` with symlinks resolved (a symlink to a folder is treated as
    that folder, and keeps pointing at the engine). Deletes and writes nothing.

    ``out`` may be new, an empty directory, or, with ``force``, an engine directory holding nothing
    but its engine. Never a folder of other files, the current directory or a parent of it, nor a
    ``protected`` path (the model's checkpoint) or a parent of one; its parent must exist and be
    writable (the engine is written beside it first)."""
    given = out
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise EngineError(f"--out {given} is a file, not a directory; choose another path")
    if not out.parent.is_dir():
        raise EngineError(f"--out {given}: its parent folder {out.parent} does not exist; create it first")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise EngineError(f"--out {given} is the current directory or a folder that holds it; give the engine a "
                          f"folder of its own, e.g. --out {Path(given) / 'engine'}")
    for path in protected:
        path = Path(path).resolve()
        if out == path or out in path.parents:
            raise EngineError(f"--out {given} is the model's checkpoint {path} or a folder that holds it; building "
                              f"there would overwrite the model: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        foreign = _non_engine_entries(out)
        if foreign is None:
            raise EngineError(f"--out {given} is not empty and is not an engine directory (it has no kvc-build "
                              f"{MANIFEST}); --force replaces only engines: choose a new or empty directory")
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise EngineError(f"--out {given} holds an engine and other files ({shown}); --force replaces only "
                              f"engines: move those files or choose another directory")
        if not force:
            raise EngineError(f"--out {given} is not empty (it holds an engine); pass --force to replace it or "
                              f"choose an empty directory")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise EngineError(f"--out {given}: its folder {out.parent} is not writable (the engine is written beside "
                          f"--out, then moved into place); choose a directory you can write to")
    return out


def _non_engine_entries(folder: Path) -> list[str] | None:
    """The entries of ``folder`` that are not part of the engine its manifest lists (the manifest,
    the listed files and their folders); None if it holds no kvc-build manifest."""
    try:
        raw = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict) or not {"format_version", "target"} <= raw.keys() \
            or not isinstance(raw.get("files"), dict):
        return None
    engine_entries = {MANIFEST} | {Path(name).parts[0] for name in raw["files"] if Path(name).parts}
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in engine_entries)


def _model_paths(model, model_name: str | None) -> list[Path]:
    """The model's checkpoint on disk, if it came from one: a build must not write over it. A preset's
    name is not a path (a folder of that name may be an engine built from it)."""
    from kvc_compile.models import PRESETS

    names = [getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
             None if model_name in PRESETS else model_name]
    paths = []
    for name in names:
        if isinstance(name, (str, os.PathLike)) and str(name) and Path(name).exists():
            path = Path(name).resolve()
            paths.append(path if path.is_dir() else path.parent)
    return paths


def _make_staging_dir(out: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.kvc-tmp-", dir=out.parent))
    except OSError as error:
        raise EngineError(f"--out {out}: cannot create a folder in {out.parent} ({error.strerror}); choose a "
                          f"directory you can write to") from error


def _normal_permissions(folder: Path) -> None:
    """The modes ``os.makedirs`` and ``open`` would give (0777/0666 less the umask): ``mkdtemp``
    makes private folders and some writers private files, and an engine is meant to be shared."""
    modes = {True: default_mode(directory=True), False: default_mode()}
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(modes[path.is_dir()])


def _move_into_place(staging: Path, out: Path, force: bool, protected: Sequence[Path]) -> None:
    """Put the finished engine at ``out``. An engine already there is renamed aside first and removed
    last, so ``out`` always holds either the old engine or the new one."""
    check_output_dir(out, force, protected)  # again: the folder may have changed during the build
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        staging.rename(out)
        return
    aside = out.with_name(f".{out.name}.kvc-old-{secrets.token_hex(4)}")
    out.rename(aside)
    try:
        staging.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


class _Stages:
    """A progress bar over the build's stages; each stage shows its elapsed time."""

    def __init__(self, console: Console, total: int, enabled: bool) -> None:
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.task = self.progress.add_task("build", total=total)

    @contextmanager
    def stage(self, description: str) -> Iterator[None]:
        self.progress.update(self.task, description=description)
        yield
        self.progress.advance(self.task)


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise EngineError(f"--target onnx needs {' and '.join(missing)}: pip install 'kvc-compile[onnx]'")


def check_build_request(config: CompressionConfig, *, target: str, dtype: torch.dtype, max_context: int,
                        max_new_tokens: int, max_batch: int, max_positions: int | None = None) -> None:
    """Refuse a build that cannot succeed or whose engine could not run, before the model loads:
    the target and its libraries, the sizes, and what the method needs of an engine."""
    if target not in TARGETS:
        raise EngineError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
    if target == "tensorrt":
        from kvc_compile.plugins.tensorrt import require_tensorrt

        try:
            require_tensorrt()
        except TargetUnavailableError as missing:
            raise EngineError(str(missing)) from None
    if target == "onnx":
        _require_onnx()
        if dtype != torch.float32:
            name = str(dtype).removeprefix("torch.")
            raise EngineError(f"--target onnx with --dtype {name}: ONNX Runtime runs the compression plugins in "
                              f"float32 only, so the engine could not run; build it with --dtype float32, or with "
                              f"--target aoti for {name}")
    for name, value in (("max_context", max_context), ("max_new_tokens", max_new_tokens), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EngineError(f"{name} must be a positive integer, got {value!r}")
    if max_positions is not None and max_context + max_new_tokens > max_positions:
        raise EngineError(f"max_context + max_new_tokens ({max_context + max_new_tokens}) exceeds the model's "
                          f"{max_positions} positions; lower --max-context or --max-new-tokens")
    if config.tune_decode and target != "aoti":
        raise EngineError(f"tune_decode compiles the decode programs with Inductor's max-autotune and frozen weights, "
                          f"and only AOTInductor engines are compiled by Inductor; build with --target aoti, or "
                          f"without --tune-decode for --target {target}")
    _prefill_ranges(config, max_context)
    layout = StateLayout.of(config)
    if layout.rolling and layout.packed:
        raise EngineError(
            f"{config.method} stores per-head budgets (packed layout), and engines compress while decoding only "
            f"dense caches; compile with torch.compile(backend='kvc') for periodic {config.method}, or build "
            f"without decoding_interval/target_size"
        )


def _prefill_ranges(config: CompressionConfig, max_context: int) -> list[tuple[int, int]]:
    """Prompt-length ranges with one program each: within a range the cache shapes are one
    expression of the length. Prompts up to the method's window are kept whole; prompts that keep a
    single entry per head get their own program (a size of 1 is special to tracing)."""
    window = config.method_impl.min_uncompressed_length if config.evicts else 0
    if window >= max_context:
        raise EngineError(f"max_context ({max_context}) must exceed {config.method}'s observation window ({window} "
                          f"tokens), or no prompt would be compressed")
    first_plural = next((n for n in range(window + 1, max_context + 1) if config.kept_length(n) >= 2), max_context + 1)
    # A one-token prompt traces as a decode step (no prefill attention for the pass to project), so
    # low-rank engines take prompts from two tokens; the runtime pads a shorter batch on the left.
    shortest = 2 if config.lowrank is not None else 1
    ranges = [(shortest, window), (window + 1, first_plural - 1), (first_plural, max_context)]
    return [(max(low, shortest), high) for low, high in ranges if max(low, shortest) <= high]


def _example_prompt(length: int, vocab: int, device: torch.device) -> tuple[Tensor, Tensor]:
    ids = torch.randint(3, vocab, (EXAMPLE_BATCH, length), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, : length // 4] = 0  # a left-padded row, so padding takes the general code path
    return ids, mask


def _batch_dim() -> torch.export.Dim:
    """The dynamic batch dimension. Its upper bound is not ``max_batch`` (the runtime enforces that):
    a bound below the example batch, or a Dim with min == max, cannot be exported."""
    return torch.export.Dim("batch", min=1, max=1024)


def _export_rewritten(program: torch.nn.Module, example: tuple, shapes, config: CompressionConfig,
                      decode_eviction: bool = True, fuse_rope: bool = True):
    """Export ``program``, let the kvc passes rewrite its aten graph, and export the result again so
    shapes and guards are re-derived. Returns the export and the rewritten module."""
    traced = torch.export.export(program, example, dynamic_shapes=shapes, strict=False)
    rewritten = traced.module()
    # ``program`` holds the transformers model: the pass checks KQ-SVD projections against its weights.
    PassManager(config, decode_eviction=decode_eviction, model=program, fuse_rope=fuse_rope).run(rewritten)
    # The rewritten module takes its inputs flat: a ``*state`` argument's shapes come out of their tuple.
    flat_shapes = tuple(item for shape in shapes for item in (shape if isinstance(shape, tuple) else (shape,)))
    return torch.export.export(rewritten, example, dynamic_shapes=flat_shapes, strict=False), rewritten


def _export_prefill(model, config: CompressionConfig, layout: StateLayout, lengths: tuple[int, int],
                    device: torch.device):
    low, high = lengths
    example = _example_prompt(max(low, min(high, (low + high) // 2, low + 64)), model.config.vocab_size, device)
    batch = _batch_dim()
    # DYNAMIC, not a named Dim: guards that hold over the range (budget formulas with min/max the
    # solver cannot simplify) must not fail the export.
    length = low if low == high else torch.export.Dim.DYNAMIC(min=low, max=high)
    shapes = ({0: batch, 1: length}, {0: batch, 1: length})
    return _export_rewritten(PrefillProgram(model, layout), example, shapes, config)


def _probe_prefill(prefill, layout: StateLayout, length: int, device) -> tuple[list[int], list[dict]]:
    """Entries per KV head each layer keeps of a ``length``-token prompt, and each layer's constant
    state (KQ-SVD factors, the same for every prompt), from one run of the rewritten prefill."""
    ids = torch.full((1, length), 3, dtype=torch.long, device=device)
    outputs = prefill(ids, torch.ones_like(ids))
    layers = unflatten(layout.prefill_record, layout.prefill_names, outputs[1:])
    constants = [{name: getattr(layer, name) for name in layout.constant_names} for layer in layers]
    return [layer.keys.shape[2] for layer in layers], constants


def _decode_example(model, layout: StateLayout, capacity: list[int], dtype: torch.dtype, device,
                    recent_queries: int = 0, constants: list[dict] | None = None, live: int | None = None) -> tuple:
    """Example inputs of a decode program; the mask spans ``live`` slots (default: the capacity)."""
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = attention_head_dim(cfg)
    layers = []
    for layer, slots in enumerate(capacity):
        heads = 1 if layout.packed else kv_heads
        # Low-rank entries are stored at their layer's ranks (the width of its down projections).
        key_dim, value_dim = ((constants[layer]["key_down"].shape[-1], constants[layer]["value_down"].shape[-1])
                              if layout.lowrank else (head_dim, head_dim))
        keys, values = (torch.zeros(EXAMPLE_BATCH, heads, slots, dim, dtype=dtype, device=device)
                        for dim in (key_dim, value_dim))
        if layout.rolling:
            layers.append(RollingState(
                keys, values, torch.full((EXAMPLE_BATCH, kv_heads, slots), -1, dtype=INDEX_DTYPE, device=device),
                torch.zeros(EXAMPLE_BATCH, cfg.num_attention_heads, recent_queries, head_dim, dtype=dtype,
                            device=device)))
            continue
        heads_of_entries = (torch.full((EXAMPLE_BATCH, 1, slots), -1, dtype=torch.int32, device=device)
                            if layout.packed else None)
        layers.append(SlotState(keys, values, heads_of_entries,
                                **{name: constants[layer][name] for name in layout.constant_names}))
    token = torch.zeros(EXAMPLE_BATCH, 1, dtype=torch.long, device=device)
    mask = torch.ones(EXAMPLE_BATCH, 1, 1, live or max(capacity), dtype=torch.bool, device=device)
    return (token, token.clone(), mask, torch.zeros(1, dtype=torch.long, device=device),
            *flatten(layers, layout.state_names))


def _decode_shapes(example: tuple, layout: StateLayout, first_live: int = 2) -> tuple:
    """Every state tensor has the batch first, except the constants (KQ-SVD factors). Slot layouts
    attend over the live prefix of their buffers, the mask's length, from ``first_live`` (the fewest
    entries the largest layer holds at a step) to the capacity; the rolling layout's buffers always
    span the mask."""
    batch = _batch_dim()
    per_layer = tuple(None if name in layout.constant_names else {0: batch} for name in layout.state_names)
    mask: dict = {0: batch}
    if not layout.rolling:
        mask[3] = torch.export.Dim("live", min=first_live, max=example[2].shape[-1])
    return ({0: batch}, {0: batch}, mask, None, per_layer * (len(example[4:]) // len(per_layer)))


def _export_lookahead(model, config: CompressionConfig, ranges, stage1_lengths: list[list[int]],
                      stages: _Stages) -> dict[str, Any]:
    """LAQ's programs besides prefill and decode: the rollout, a rolling-layout decode step over the
    stage-1 cache that only appends (the kvc pass shifts each pseudo token's query into the buffer),
    and stage 2 per prompt range. Returns them (``_ExportedEngine``'s ``rollout``,
    ``rollout_capacity`` and ``stage2``) and, as ``kept``, per range the entries stage 2 keeps per layer."""
    parameter = next(model.parameters())
    steps = config.method_impl.lookahead
    rolling = StateLayout(packed=False, lowrank=False, rolling=True)
    stage1_slots = [max(lengths) for lengths in zip(*stage1_lengths, strict=True)]
    capacity = [max(stage1_slots) + steps] * len(stage1_slots)
    example = _decode_example(model, rolling, capacity, parameter.dtype, parameter.device, config.recent_queries)
    with stages.stage(f"export rollout ({steps} pseudo tokens)"):
        rollout, _ = _export_rewritten(DecodeProgram(model, rolling, stage1_slots), example,
                                       _decode_shapes(example, rolling),
                                       config, decode_eviction=False)
    stage2, kept = [], []
    for low, high in ranges:
        name = f"stage2_{low}_{high}"
        with stages.stage(f"export {name}"):
            exported = _export_stage2(model, config, (low, high))
            outputs = exported.module()(*_stage2_example(model, config, high))
            kept.append([layer.keys.shape[2] for layer in unflatten(Stage2Output, Stage2Output._fields, outputs)])
            stage2.append(_Program(name, exported, low, high))
    return {"rollout": _Program("rollout", rollout), "rollout_capacity": capacity[0], "stage2": stage2, "kept": kept}


def _stage2_example(model, config: CompressionConfig, length: int) -> tuple:
    cfg = model.config
    parameter = next(model.parameters())
    head_dim = attention_head_dim(cfg)
    generator = torch.Generator().manual_seed(0)

    def states(heads: int, count: int) -> Tensor:
        return torch.randn(EXAMPLE_BATCH, heads, count, head_dim, generator=generator).to(parameter)

    _, mask = _example_prompt(length, cfg.vocab_size, parameter.device)
    pseudo_valid = torch.ones(EXAMPLE_BATCH, config.method_impl.lookahead, dtype=torch.bool, device=parameter.device)
    layers = [Stage2Input(states(cfg.num_key_value_heads, length), states(cfg.num_key_value_heads, length),
                          states(cfg.num_attention_heads, config.recent_queries))
              for _ in range(cfg.num_hidden_layers)]
    return (mask, pseudo_valid, *flatten(layers, Stage2Input._fields))


def _export_stage2(model, config: CompressionConfig, lengths: tuple[int, int]):
    low, high = lengths
    example = _stage2_example(model, config, max(low, min(high, (low + high) // 2, low + 64)))
    batch = _batch_dim()
    length = low if low == high else torch.export.Dim.DYNAMIC(min=low, max=high)
    per_layer = Stage2Input(prompt_keys={0: batch, 2: length}, prompt_values={0: batch, 2: length},
                            recent_queries={0: batch})
    shapes = ({0: batch, 1: length}, {0: batch}, tuple(per_layer) * model.config.num_hidden_layers)
    return torch.export.export(LookaheadStage2Program(config), example, dynamic_shapes=shapes, strict=False)


def _decode_capacity(config: CompressionConfig, layout: StateLayout, prompt_slots: list[int], max_new_tokens: int,
                     kv_heads: int) -> list[int]:
    """Slots per layer of the decode buffers: the prompt's entries plus every decoded token's, or,
    with compression while decoding (the rolling layout), ``target_size + decoding_interval`` (the most
    a layer holds)."""
    if not layout.packed and len(set(prompt_slots)) > 1:
        raise EngineError(f"layers keep different numbers of prompt entries ({sorted(set(prompt_slots))}) in the "
                          f"dense layout, which engines do not support")
    if layout.rolling:
        threshold = config.decode_threshold
        if max(prompt_slots) >= threshold:
            raise EngineError(
                f"{config.method}: the prefill keeps up to {max(prompt_slots)} entries per KV head, and engines "
                f"compress while decoding over buffers of target_size + decoding_interval ({threshold}) entries; "
                f"keep at most {threshold - 1} at prefill (a budget no larger than target_size) or raise target_size"
            )
        return [threshold] * len(prompt_slots)
    entries_per_token = kv_heads if layout.packed else 1
    # At least 3 tokens' slots, so the decode program's live prefix has a range to be dynamic over
    # (see _export_programs) even when the engine decodes one or two tokens.
    tokens = max(max_new_tokens, 3)
    return [slots + tokens * entries_per_token for slots in prompt_slots]


class SharedWeights:
    """The weights of every AOTInductor or exported program, stored once in ``weights.safetensors``.

    Each package is compiled without its constants (each exported program saved with data-less
    placeholders); at load time they are handed the tensors of this one file, so the engine holds
    (on disk and in memory) one copy of the model, not one per program. A tensor is stored once
    under its first name; a later program's constant that is a different tensor under a taken name
    is stored under a fresh key."""

    FILE = "weights.safetensors"

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.keys_by_identity: dict[tuple, str] = {}
        self.programs: dict[str, dict[str, str]] = {}  # program file -> {constant name: stored key}

    def add(self, program_file: str, exported) -> None:
        mapping = {}
        for name, tensor in {**exported.state_dict, **exported.constants}.items():
            if not isinstance(tensor, Tensor):
                continue
            tensor = tensor.detach()
            identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            key = self.keys_by_identity.get(identity)
            if key is None:
                key = name if name not in self.tensors else f"{program_file}/{name}"
                self.tensors[key] = tensor.contiguous()
                self.keys_by_identity[identity] = key
            mapping[name] = key
        self.programs[program_file] = mapping

    def save(self, out: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        save_file(self.tensors, str(out / self.FILE))
        return {"file": self.FILE, "programs": self.programs}


def _save_program(exported, path: Path, target: str, weights=None, tuned: bool = False) -> str:
    """Write one program; ``weights`` gathers the constants of every program into one file
    (``SharedWeights`` for AOTInductor and exported programs, ``SharedOnnxWeights`` for ONNX).

    A ``tuned`` program (AOTInductor only) is compiled with max-autotune and frozen weights
    (``kvc_compile.backend.tuning``): its GEMMs read weights packed at compile time, which exist only
    inside its library, so it carries them there and takes nothing from the shared file. Compiled
    without them (``package_constants_in_so`` off), such a package crashes when loaded (torch 2.13)."""
    if target == "onnx":
        from kvc_compile.plugins.onnx import export_onnx

        return export_onnx(exported, path.with_suffix(".onnx"), weights).name
    if target == "aoti":
        settings = {**DECODE_TUNING, "aot_inductor.package_constants_in_so": True} if tuned \
            else {"aot_inductor.package_constants_in_so": False}
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path.with_suffix(".pt2")),
                                                 inductor_configs=settings)
        if not tuned:
            weights.add(path.with_suffix(".pt2").name, exported)
        return path.with_suffix(".pt2").name
    weights.add(path.with_suffix(".ep.pt2").name, exported)
    with without_weights(exported):  # torch.export.save would store a copy of the weights in every program
        torch.export.save(exported, str(path.with_suffix(".ep.pt2")))
    return path.with_suffix(".ep.pt2").name


def build(
    model,
    options: dict[str, Any] | CompressionConfig,
    out: str | Path,
    *,
    target: str = "aoti",
    tokenizer=None,
    model_name: str | None = None,
    max_context: int = 2048,
    max_new_tokens: int = 256,
    max_batch: int = 8,
    force: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> BuildResult:
    """Build an engine directory for ``model`` compressed as ``options`` say; see the module docstring.

    ``max_context`` bounds the prompt length, ``max_new_tokens`` the decoded tokens (the decode
    program's capacity is the prompt slots plus this), ``max_batch`` the batch size.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    config = CompressionConfig.from_options(options)
    check_build_request(config, target=target, dtype=next(model.parameters()).dtype, max_context=max_context,
                        max_new_tokens=max_new_tokens, max_batch=max_batch,
                        max_positions=getattr(model.config, "max_position_embeddings", None))
    _check_model(model)
    protected = _model_paths(model, model_name)
    out = check_output_dir(out, force, protected)
    staging = _make_staging_dir(out)
    try:
        with warnings.catch_warnings():
            # The build traces short example prompts on purpose; the op's advice about them is for users' prompts.
            warnings.simplefilter("ignore", ShortPromptWarning)
            manifest = _write_engine(model, config, staging, target=target, tokenizer=tokenizer,
                                     model_name=model_name, max_context=max_context, max_new_tokens=max_new_tokens,
                                     max_batch=max_batch, progress=progress, console=console)
        _normal_permissions(staging)
        nbytes = sum(path.stat().st_size for path in staging.rglob("*") if path.is_file())
        _move_into_place(staging, out, force, protected)
    finally:
        if staging.exists():  # a failed or interrupted build leaves nothing behind
            shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(out, manifest, time.perf_counter() - started, nbytes)


@dataclass
class _Program:
    """One exported program before it is compiled: its file name (no suffix) and the prompt lengths it
    takes (prefill, stage 2) or its capacity (decode steps)."""

    name: str
    exported: torch.export.ExportedProgram
    min_length: int = 1
    max_length: int = 1
    tuned: bool = False  # compiled with max-autotune and frozen weights, which it carries (``_save_program``)


@dataclass
class _ExportedEngine:
    """Every program of an engine, exported, with the sizes the manifest records."""

    layout: StateLayout  # of the decode programs (LAQ decodes from stage 2's cache in the slot layout)
    prefill: list[_Program]
    decode: _Program
    prompt_slots: list[int]
    capacity: list[int]
    kept: list[list[int]]  # per prompt range: entries kept per KV head per layer
    decode_evict: _Program | None = None
    rollout: _Program | None = None  # LAQ
    rollout_capacity: int | None = None
    stage2: list[_Program] = field(default_factory=list)

    @property
    def programs(self) -> list[_Program]:
        """In the order they are compiled (and their weights gathered)."""
        extra = [self.rollout, *self.stage2] if self.rollout is not None else []
        return [*self.prefill, *extra, self.decode, *([self.decode_evict] if self.decode_evict is not None else [])]


def _check_model(model) -> None:
    windows = sliding_windows(model.config)
    if windows:  # the engines' cache layouts have no windowed layers yet: they would store every token
        raise EngineError(f"{type(model).__name__} has sliding-window layers ({len(windows)} of "
                          f"{model.config.num_hidden_layers}, window {max(windows.values())}), which engines do not "
                          f"support yet; compress it with torch.compile instead: model.compile(backend='kvc', "
                          f"options=...) and generate with kvc_compile.CompressedCache(config=model.config)")


def _write_engine(model, config: CompressionConfig, out: Path, *, target: str, tokenizer, model_name: str | None,
                  max_context: int, max_new_tokens: int, max_batch: int, progress: bool, console: Console) -> Manifest:
    """Export every program, compile each for ``target``, then write the weights, the tokenizer and the
    manifest into ``out``."""
    ranges = _prefill_ranges(config, max_context)
    layout = StateLayout.of(config)
    model = model.eval()
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    programs = len(ranges) + 1 + (1 if layout.rolling else 0) + (1 + len(ranges) if layout.lookahead else 0)
    stages = _Stages(console, total=2 * programs, enabled=progress)
    weights = _shared_weights(target, out)
    with stages.progress, torch.no_grad():
        exported = _export_programs(model, config, ranges, max_new_tokens, target, stages)
        files = {program.name: _compile_program(program, out, target, weights, stages)
                 for program in exported.programs}
    return _write_manifest(model, config, exported, files, out, target=target, weights=_write_weights(weights, out),
                           tokenizer_dir=_write_tokenizer(tokenizer, out), tokenizer=tokenizer, model_name=model_name,
                           max_context=max_context, max_new_tokens=max_new_tokens, max_batch=max_batch)


def _export_programs(model, config: CompressionConfig, ranges: list[tuple[int, int]], max_new_tokens: int,
                     target: str, stages: _Stages) -> _ExportedEngine:
    """Stage 1: export every program with the kvc pass applied, and probe what the prefill keeps."""
    layout = StateLayout.of(config)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prefill: list[_Program] = []
    kept: list[list[int]] = []
    for low, high in ranges:
        name = f"prefill_{low}_{high}"
        with stages.stage(f"export {name} (prompts of {low}-{high} tokens) and insert compression"):
            program, rewritten = _export_prefill(model, config, layout, (low, high), device)
            lengths, constants = _probe_prefill(rewritten, layout, high, device)
        prefill.append(_Program(name, program, low, high))
        kept.append(lengths)
    lookahead: dict[str, Any] = {}
    if layout.lookahead:
        lookahead = _export_lookahead(model, config, ranges, kept, stages)
        kept = lookahead.pop("kept")
        layout = StateLayout(packed=False, lowrank=False)  # decoding starts from stage 2's cache
    prompt_slots = [max(lengths) for lengths in zip(*kept, strict=True)]
    capacity = _decode_capacity(config, layout, prompt_slots, max_new_tokens, model.config.num_key_value_heads)
    program = DecodeProgram(model, layout, prompt_slots, return_state=target == "onnx")
    # The live prefix a step reads: dense, a prompt's entries then the tokens' from slot 0 (the
    # runtime packs them, so at least 2); packed, the tokens' entries after every layer's prompt
    # slots (layers differ in kept entries, so one slot input cannot place them right after each
    # layer's own). The last of the max_new_tokens - 1 steps leaves one token's slots unread, so
    # the prefix never spans the whole buffer: no shape guard can tie it to the capacity.
    per_token = model.config.num_key_value_heads if layout.packed else 1
    live = None if layout.rolling else max(capacity) - per_token
    example = _decode_example(model, layout, capacity, dtype, device, config.recent_queries, constants, live)
    shapes = _decode_shapes(example, layout, max(prompt_slots) + per_token if layout.packed else 2)
    with stages.stage("export decode (fixed capacity)"):
        # The passes read the cache with native GQA and, for the rolling layout, shift the query buffer.
        decode, _ = _export_rewritten(program, example, shapes, config, decode_eviction=False,
                                      fuse_rope=target != "onnx")
    decode_evict = None
    if layout.rolling:
        with stages.stage(f"export decode_evict (back to {config.decode_target} entries) and insert eviction"):
            evicting, _ = _export_rewritten(program, example, shapes, config)
        decode_evict = _Program("decode_evict", evicting, 1, max(capacity), tuned=config.tune_decode)
    return _ExportedEngine(layout, prefill, _Program("decode", decode, 1, max(capacity), tuned=config.tune_decode),
                           prompt_slots, capacity, kept, decode_evict, **lookahead)


def _compile_program(program: _Program, out: Path, target: str, weights, stages: _Stages) -> str:
    """Stage 2: one exported program compiled for ``target`` and written; returns its file name."""
    tuned = ", tuned: max-autotune, frozen weights" if program.tuned else ""
    with stages.stage(f"compile {program.name} ({target}{tuned})"):
        return _save_program(program.exported, out / program.name, target, weights, program.tuned)


def _shared_weights(target: str, out: Path):
    """Where the programs' weights are gathered as they are compiled (see ``_save_program``)."""
    if target == "onnx":
        from kvc_compile.plugins.onnx.weights import SharedOnnxWeights

        return SharedOnnxWeights(out)
    return SharedWeights() if target in ("aoti", "exported") else None


def _write_weights(weights, out: Path) -> dict[str, Any] | None:
    """Stage 3: the shared weights file; returns the manifest's ``weights`` entry."""
    if isinstance(weights, SharedWeights):
        return weights.save(out)
    if weights is not None:  # ONNX: the graphs name it as their external data
        return {"file": weights.path.name}
    return None


def _write_tokenizer(tokenizer, out: Path) -> str | None:
    if tokenizer is None:
        return None
    tokenizer.save_pretrained(out / "tokenizer")
    return "tokenizer"


def _write_manifest(model, config: CompressionConfig, exported: _ExportedEngine, files: dict[str, str], out: Path, *,
                    target: str, weights: dict[str, Any] | None, tokenizer_dir: str | None, tokenizer,
                    model_name: str | None, max_context: int, max_new_tokens: int, max_batch: int) -> Manifest:
    """Stage 4: ``manifest.json``, with the SHA-256 of every file written before it."""

    def entry(program: _Program) -> ProgramEntry:
        return ProgramEntry(files[program.name], program.min_length, program.max_length)

    lookahead = None
    if exported.rollout is not None:
        lookahead = {"steps": config.method_impl.lookahead, "capacity": exported.rollout_capacity,
                     "rollout": files[exported.rollout.name],
                     "stage2": [asdict(entry(program)) for program in exported.stage2]}
    kept = exported.kept
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        target=target,
        model=model_summary(model, model_name, next(model.parameters()).dtype),
        compression=json.loads(config.to_spec()),
        device=str(next(model.parameters()).device),
        max_context=max_context,
        max_new_tokens=max_new_tokens,
        max_batch=max_batch,
        state_names=list(exported.layout.state_names),
        packed=exported.layout.packed,
        prompt_slots=exported.prompt_slots,
        capacity=exported.capacity,
        budgets={"at_max_context": kept[-1], **({"short_prompts": kept[0]} if len(kept) > 1 else {})},
        prefill=[entry(program) for program in exported.prefill],
        decode=entry(exported.decode),
        decode_evict=entry(exported.decode_evict) if exported.decode_evict is not None else None,
        decode_target=config.decode_target,
        tuned_decode=config.tune_decode,
        lookahead=lookahead,
        eos_token_ids=eos_ids(model, tokenizer),
        pad_token_id=pad_id(model, tokenizer),
        versions=library_versions(),
        tokenizer=tokenizer_dir,
        weights=weights,
    )
    manifest.write(out)
    return manifest


def model_summary(model, name: str | None, dtype: torch.dtype) -> dict[str, Any]:
    cfg = model.config
    head_dim = attention_head_dim(cfg)
    return {
        "name": name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "layers": cfg.num_hidden_layers,
        "kv_heads": cfg.num_key_value_heads,
        "query_heads": cfg.num_attention_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
    }


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_id(model, tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(model.generation_config, "pad_token_id", None),
                      *eos_ids(model, tokenizer)):
        if candidate is not None:
            return int(candidate)
    return 0


def library_versions() -> dict[str, str]:
    import transformers

    versions = {"kvc_compile": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


__all__ = ["TARGETS", "BuildResult", "EngineError", "build", "check_build_request", "check_output_dir"]
