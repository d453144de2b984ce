"""``Engine``: load an engine directory and generate with it; no model code is imported.

    engine = kvc_compile.Engine.load("engine/")
    result = engine.generate(["Summarise: ...", "Translate: ..."], max_new_tokens=64)
    print(result.texts)

The prefill program returns the compressed cache; its entries are copied into buffers of the
decode program's fixed capacity (prompt entries first, then one slot per decoded token: right after
the prompt's kept entries in a dense cache, after the layer's prompt slots in a packed one). A step
attends over the live prefix of the buffers only, as long as the mask it gets; the mask marks the
slots holding real entries the same way the compiled path slices its 2-D mask: prompt entry ``j`` of
``k`` kept stands at logical position ``n - k + j``.

Engines that compress while decoding keep each layer's entries at the end of its buffers (the
rolling layout of ``kvc_compile.engine.programs``). Each step the runtime knows how many entries a
layer holds, as the compiled path does, and calls the evicting program when the step brings it to
``target_size + decoding_interval``. Eviction keeps real entries before padding, and kept entries
stay in cache order, so after it the mask marks each row's last ``min(real entries, target_size)``
slots, computed on the device.

LAQ engines roll out their pseudo tokens with a rolling-layout program over the stage-1 cache (a
fixed number of greedy steps; a row's queries after an EOS do not vote), run stage 2 on the full
prompt entries, and decode from its cache with the plain decode program.
"""

from __future__ import annotations

import importlib.util
import math
import operator
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import kvc_compile.ops  # noqa: F401
from kvc_compile.engine.manifest import MANIFEST, EngineError, Manifest, ProgramEntry
from kvc_compile.engine.state import (
    LOWRANK_NAMES,
    LookaheadState,
    RollingState,
    SlotState,
    Stage2Input,
    Stage2Output,
    flatten,
    prefill_names,
    state_record,
    unflatten,
)
from kvc_compile.lookahead import TokenCallback, generate_tokens, rollout
from kvc_compile.ops.compress import ShortPromptWarning

# One prompt (a string, or token ids) or a batch of them (see Engine.encode).
Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | Tensor


@dataclass
class Generation:
    tokens: list[list[int]]  # generated per prompt, up to and including EOS
    texts: list[str] | None
    prefill_seconds: float
    decode_seconds: float
    prompt_lengths: list[int] = field(default_factory=list)
    cache_bytes: int = 0  # the compressed cache the prefill returned (entries, positions, heads)
    notes: list[str] = field(default_factory=list)  # what the user may want to know, e.g. a prompt kept whole


PREFILL_ARGS = ("input_ids", "attention_mask")
DECODE_ARGS = ("input_ids", "position_ids", "attention_mask", "slot")


# What an AOTInductor package may hold. torch._inductor.aoti_load_package (torch 2.13) goes through
# torch.export.pt2_archive._package.load_pt2, which deserializes every exported program the archive
# holds under models/ (their weights and constants with torch.load(weights_only=False) and
# pickle.loads, their sample inputs with a fallback to weights_only=False), and with
# load_weights_from_disk (off here) reads data/weights/ with torch.load. The packages kvc-build
# writes hold only data/aotinductor/ (the compiled library, compiled without its constants), so an
# archive with other model payloads is refused before torch reads it. Loading the library itself
# runs its native code, like loading any shared library: that is why an engine must be trusted.
_AOTI_PICKLED_ENTRIES = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/")


def _load_program(path: Path, target: str, arg_names: Sequence[str] = PREFILL_ARGS,
                  written: Sequence[int] | None = None, onnx_weights=None, trusted: bool = False):
    """A program file as a callable. ONNX programs name their inputs (``arg_names``, in call order);
    ``written`` lists the arguments that are buffers the program writes in place, and
    ``onnx_weights`` is the engine's shared weights file, read once for every program.

    An exported program is returned as the ``ExportedProgram`` without its weights:
    ``_load_shared_weights`` replaces it with its runnable module. Reading one unpickles parts of
    the file (``torch.export.load``), which can run any code a crafted file holds, so it is refused
    unless ``trusted``."""
    if target == "onnx":
        from kvc_compile.plugins.onnx.runtime import OnnxProgram

        return OnnxProgram(path, arg_names, written=written, weights=onnx_weights)
    if target == "aoti":
        # A .pt2 package is a zip archive whose entries sit under one top folder: read the names with
        # zipfile (public, on every torch version) rather than torch's private archive reader.
        with zipfile.ZipFile(path) as archive:
            names = [name.split("/", 1)[-1] for name in archive.namelist()]
        pickled = [name for name in names if name.startswith(_AOTI_PICKLED_ENTRIES)]
        if pickled:
            raise EngineError(f"{path} is not an AOTInductor package written by kvc-build: it holds {pickled[0]}, "
                              f"which torch would unpickle on load; rebuild the engine with kvc-build")
        return _DenseInputs(torch._inductor.aoti_load_package(str(path)), arg_names)
    if not trusted:
        raise EngineError(f"engine {path.parent} was built with --target exported, and loading it unpickles parts "
                          f"of its .pt2 files (torch.export.load), which runs any code a crafted file holds; if you "
                          f"built it or trust who did, load it with Engine.load({str(path.parent)!r}, trusted=True) "
                          f"or kvc-run --trust-engine")
    return torch.export.load(str(path))


class _DenseInputs:
    """An AOTInductor program that refuses strided views as inputs: a package reads its inputs with
    the strides it was compiled for (contiguous) and does not check them, so a view (a slice of a
    longer buffer) would be read wrongly without an error. Everything else is the package's own."""

    def __init__(self, program, arg_names: Sequence[str]) -> None:
        self.program = program
        self.arg_names = arg_names

    def __call__(self, *args: Tensor):
        for index, arg in enumerate(args):
            if isinstance(arg, Tensor) and not arg.is_contiguous():
                name = self.arg_names[index] if index < len(self.arg_names) else f"argument {index}"
                raise EngineError(f"{name} is a strided view ({tuple(arg.shape)}, strides {arg.stride()}); an "
                                  f"AOTInductor program reads contiguous inputs only: pass .contiguous()")
        return self.program(*args)

    def __getattr__(self, name: str):
        return getattr(self.program, name)


def _program_signatures(manifest: Manifest) -> dict[str, tuple[tuple[str, ...], list[int] | None]]:
    """Per program file: its arguments' names, and which of them it writes in place (None: it
    returns its state instead, as rolling-layout steps and every prefill and stage-2 program do).
    In-place steps write every buffer but the per-layer constants (KQ-SVD factors)."""
    layers = len(manifest.prompt_slots)

    def state(per_layer: int) -> tuple[str, ...]:
        return tuple(f"state_{i}" for i in range(per_layer * layers))

    names = manifest.state_names * layers
    written = None
    if state_record(manifest.state_names) is SlotState:
        written = [len(DECODE_ARGS) + i for i, name in enumerate(names) if name not in LOWRANK_NAMES]
    signatures = {entry.file: (PREFILL_ARGS, None) for entry in manifest.prefill}
    signatures[manifest.decode.file] = (DECODE_ARGS + state(len(manifest.state_names)), written)
    if manifest.decode_evict is not None:
        signatures[manifest.decode_evict.file] = (DECODE_ARGS + state(len(manifest.state_names)), None)
    if manifest.lookahead is not None:
        signatures[manifest.lookahead["rollout"]] = (DECODE_ARGS + state(len(RollingState._fields)), None)
        stage2 = ("prompt_mask", "pseudo_valid") + state(len(Stage2Input._fields))
        signatures.update({entry.file: (stage2, None) for entry in manifest.stage2})
    return signatures


def _load_shared_weights(folder: Path, manifest: Manifest, programs: dict) -> dict[str, Tensor]:
    """Hand each AOTInductor or exported program its constants from the engine's one weights file
    (safetensors: no pickle). Exported programs are replaced in ``programs`` by their runnable
    modules, which hold these tensors (not copies)."""
    if manifest.target == "onnx":  # ONNX graphs read theirs as external data
        return {}
    tensors: dict[str, Tensor] = {}
    if manifest.weights is not None:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / manifest.weights["file"]), device=manifest.device)
    for file, program in programs.items():
        if file in manifest.self_contained:  # tuned: compiled with its own (packed) weights
            continue
        names = manifest.weights["programs"][file] if manifest.weights is not None else {}
        if manifest.target == "exported":
            from kvc_compile.engine.programs import with_weights

            # An engine without a weights file keeps its weights inside its programs.
            programs[file] = with_weights(program, names, tensors) if manifest.weights is not None else program.module()
        elif manifest.weights is not None:
            program.load_constants({name: tensors[names[name]] for name in program.get_constant_fqns()},
                                   check_full_update=True, user_managed=True)
    return tensors


def _check_onnx_runnable(folder: Path, manifest: Manifest) -> None:
    missing = [name for name in ("onnxruntime", "onnxruntime_extensions") if importlib.util.find_spec(name) is None]
    if missing:
        raise EngineError(f"engine {folder} is an ONNX engine and needs {' and '.join(missing)}: "
                          f"pip install 'kvc-compile[onnx]'")
    if manifest.model.get("dtype") != "float32":
        raise EngineError(f"engine {folder} is a {manifest.model.get('dtype')} ONNX engine; ONNX Runtime runs the "
                          f"compression plugins in float32 only: rebuild it with --dtype float32")


class Engine:
    """A built engine: prefill programs by prompt length, one decode program, the tokenizer."""

    def __init__(self, folder: Path, manifest: Manifest, programs: dict[str, Callable], tokenizer) -> None:
        self.folder = folder
        self.manifest = manifest
        self._programs = programs  # by file name
        self._decode = programs[manifest.decode.file]
        self._decode_evict = programs[manifest.decode_evict.file] if manifest.decode_evict is not None else None
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: str | Path, *, trusted: bool = False) -> Engine:
        """Load the engine directory ``folder``, after checking its manifest and files' SHA-256.

        Loading runs code from the engine's files: an AOTInductor engine (the default target) is a
        compiled library whose native code runs as it loads, like any shared library, and an
        ``exported`` engine's ``.pt2`` files are partly unpickled. Load only engines you built or
        trust. ``exported`` engines are refused unless ``trusted=True`` (``kvc-run --trust-engine``).
        """
        folder = Path(folder)
        manifest = Manifest.read(folder)
        if manifest.target not in ("aoti", "exported", "onnx"):
            raise EngineError(f"engine {folder} was built for target {manifest.target!r}, which Engine does not run; "
                              f"build it with --target aoti")
        try:
            device = torch.device(manifest.device)
        except RuntimeError as error:
            raise EngineError(f"{folder / MANIFEST}: 'device' {manifest.device!r} is not a device name; the manifest "
                              f"was edited or is corrupted: rebuild the engine with kvc-build --force") from error
        if device.type not in ("cpu", "cuda"):
            raise EngineError(f"engine {folder} was built for {manifest.device}, and engines run on cpu or cuda; "
                              f"rebuild it with kvc-build --device cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"engine {folder} was built for {manifest.device}, and this machine has no CUDA device; "
                              f"build it on this machine with kvc-build")
        if manifest.target == "onnx":
            _check_onnx_runnable(folder, manifest)
        try:
            signatures = _program_signatures(manifest)
            onnx_weights = None
            if manifest.target == "onnx":
                from kvc_compile.plugins.onnx.weights import SharedOnnxWeightsReader

                onnx_weights = SharedOnnxWeightsReader(folder)
            programs = {entry.file: _load_program(folder / entry.file, manifest.target, *signatures[entry.file],
                                                  onnx_weights=onnx_weights, trusted=trusted)
                        for entry in manifest.programs}
            weights = _load_shared_weights(folder, manifest, programs)
        except EngineError:  # already says what is wrong and how to fix it
            raise
        except Exception as error:  # a package from another torch build fails in many ways
            raise EngineError(f"engine {folder} could not be loaded ({type(error).__name__}: {error}); it was built "
                              f"with {manifest.versions}: rebuild it with this machine's libraries") from error
        tokenizer = None
        if manifest.tokenizer is not None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(folder / manifest.tokenizer)
            except (OSError, ValueError) as error:
                raise EngineError(f"engine {folder}: its tokenizer ({manifest.tokenizer}/) could not be loaded "
                                  f"({type(error).__name__}: {error}); rebuild the engine with kvc-build --force") \
                    from error
        engine = cls(folder, manifest, programs, tokenizer)
        engine._weights = weights  # the programs read these tensors: they live as long as the engine
        return engine

    @property
    def device(self) -> torch.device:
        return torch.device(self.manifest.device)

    def encode(self, prompts: Prompts) -> tuple[Tensor, Tensor]:
        """Token ids and mask, left-padded. ``prompts`` is one prompt or a list of them: text (needs
        the tokenizer) or token ids (a list of ints, or a 1-D or 2-D integer tensor, one row per
        prompt). A single string is one prompt. Every token id must be in the engine's vocabulary."""
        rows = _prompt_rows(prompts)
        if all(isinstance(prompt, str) for prompt in rows):
            if self.tokenizer is None:
                raise EngineError(f"engine {self.folder} has no tokenizer (its model came without one); pass token "
                                  f"ids instead of text")
            empty = [i for i, prompt in enumerate(rows) if not prompt]
            if empty:
                raise EngineError(f"prompt {empty[0]} is empty text; every prompt needs at least one token")
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token_id = self.manifest.pad_token_id
            batch = self.tokenizer(rows, return_tensors="pt", padding=True)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            tokenless = (mask.sum(-1) == 0).nonzero().flatten().tolist()
            if tokenless:
                raise EngineError(f"prompt {tokenless[0]} ({rows[tokenless[0]]!r}) encodes to no tokens; every prompt "
                                  f"needs at least one token")
            for i, row in enumerate(ids.tolist()):
                self._check_vocabulary(i, [token for token, real in zip(row, mask[i].tolist(), strict=True) if real])
            return ids, mask
        token_rows = [_token_ids(i, prompt) for i, prompt in enumerate(rows)]
        for i, row in enumerate(token_rows):
            if not row:
                raise EngineError(f"prompt {i} is empty; every prompt needs at least one token")
            self._check_vocabulary(i, row)
        width = max(map(len, token_rows))
        ids = torch.full((len(token_rows), width), self.manifest.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(token_rows), width, dtype=torch.long)
        for i, row in enumerate(token_rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask

    def _check_vocabulary(self, index: int, row: Sequence[int]) -> None:
        """Every target would read out of its embedding table (ONNX Runtime wraps negative ids around)."""
        vocab = self.manifest.model["vocab_size"]
        outside = [token for token in row if not 0 <= token < vocab]
        if outside:
            raise EngineError(f"prompt {index}: token id {outside[0]} is not in this engine's vocabulary of {vocab} "
                              f"tokens (ids 0 to {vocab - 1})")

    def generate(
        self,
        prompts: Prompts,
        max_new_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_on_eos: bool = True,
        on_token: TokenCallback | None = None,
    ) -> Generation:
        """Greedy (``temperature=0``) or sampled generation for one prompt or a batch of prompts (see
        ``encode``; padded on the left). ``max_new_tokens`` defaults to the engine's decode capacity.

        A prompt no longer than the method's observation window is kept whole (uncompressed): the
        result's ``notes`` say so."""
        manifest = self.manifest
        max_new_tokens = manifest.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_sampling(manifest, max_new_tokens, temperature, top_k, top_p, seed)
        ids, mask = self.encode(prompts)
        shortest = manifest.prefill[0].min_length  # low-rank engines: 2 (see build._prefill_ranges)
        if ids.shape[1] < shortest:
            padding = shortest - ids.shape[1]
            ids = F.pad(ids, (padding, 0), value=manifest.pad_token_id)
            mask = F.pad(mask, (padding, 0))
        batch, length = ids.shape
        if length > manifest.max_context:
            raise EngineError(f"a prompt has {length} tokens, more than this engine's max context of "
                              f"{manifest.max_context}; shorten it or rebuild with --max-context {length}")
        if batch > manifest.max_batch:
            raise EngineError(f"{batch} prompts exceed this engine's max batch of {manifest.max_batch}; pass at most "
                              f"{manifest.max_batch} at a time or rebuild with --max-batch {batch}")
        ids, mask = ids.to(self.device), mask.to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        pick = _sampler(temperature, top_k, top_p, generator)
        eos = torch.tensor(manifest.eos_token_ids if stop_on_eos else [], dtype=torch.long, device=self.device)

        started = time.perf_counter()
        with torch.no_grad():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                logits, *outputs = self._prefill_program(length)(ids, mask)
                if manifest.lookahead is not None:
                    state = self._lookahead(unflatten(LookaheadState, LookaheadState._fields, outputs), mask,
                                            logits.argmax(-1), eos)
                else:
                    state = unflatten(state_record(manifest.state_names), prefill_names(manifest.state_names),
                                      outputs)
            notes = _prefill_notes(caught, batch)
            if manifest.decode_evict is not None:
                steps = _RollingSteps(self, state, mask, manifest.capacity[0], self._decode, self._decode_evict,
                                     manifest.decode_target)
            else:
                steps = _SlotSteps(self, state, mask)
            cache_bytes = sum(tensor.nbytes for layer in state for tensor in layer if tensor is not None)
            token = pick(logits)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            prefill_seconds = time.perf_counter() - started
            started = time.perf_counter()
            generated = generate_tokens(steps, token[:, None], mask, max_new_tokens, pick=pick, eos=eos,
                                        pad_token_id=manifest.pad_token_id, on_token=on_token)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        decode_seconds = time.perf_counter() - started
        rows = [_until_eos(row, manifest.eos_token_ids if stop_on_eos else []) for row in generated.tolist()]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True) if self.tokenizer is not None else None
        return Generation(rows, texts, prefill_seconds, decode_seconds, mask.sum(-1).tolist(), cache_bytes, notes)

    def _prefill_program(self, length: int, entries: Sequence[ProgramEntry] | None = None):
        """The program of ``entries`` (default: the prefill programs) that takes ``length``-token prompts."""
        for entry in entries or self.manifest.prefill:
            if entry.min_length <= length <= entry.max_length:
                return self._programs[entry.file]
        raise EngineError(f"no prefill program of this engine takes {length}-token prompts")

    def _lookahead(self, state: Sequence[LookaheadState], prompt_mask: Tensor, first_token: Tensor,
                   eos: Tensor) -> list[SlotState]:
        """LAQ: roll out the pseudo tokens on the stage-1 cache, then stage 2; returns the cache to decode from."""
        lookahead = self.manifest.lookahead
        stage1 = [layer.stage1() for layer in state]
        steps = _RollingSteps(self, stage1, prompt_mask, lookahead["capacity"], self._programs[lookahead["rollout"]])
        voting = rollout(steps, first_token[:, None], prompt_mask, lookahead["steps"], eos)
        stage2_inputs = [Stage2Input(layer.prompt_keys, layer.prompt_values, rolled.recent_queries)
                         for layer, rolled in zip(state, steps.layers, strict=True)]
        stage2 = self._prefill_program(prompt_mask.shape[1], self.manifest.stage2)
        outputs = stage2(prompt_mask, voting, *flatten(stage2_inputs, Stage2Input._fields))
        return [SlotState(layer.keys, layer.values, positions=layer.positions)
                for layer in unflatten(Stage2Output, Stage2Output._fields, outputs)]


class _SlotSteps:
    """Decode steps over slot buffers: the prompt's entries first, then one slot per step, written in place."""

    def __init__(self, engine: Engine, state: Sequence[SlotState], prompt_mask: Tensor) -> None:
        self.engine = engine
        manifest = engine.manifest
        self.layers = [self._in_buffers(layer, capacity, manifest.state_names)
                       for layer, capacity in zip(state, manifest.capacity, strict=True)]
        self.buffers = flatten(self.layers, manifest.state_names)  # what every step is handed, written in place
        kept = [layer.keys.shape[2] for layer in state]
        # The token slot of the first decoded token in the layer with the most prompt slots (the
        # program offsets the others): dense layers keep one length, so right after the prompt's
        # entries; packed layers each after their prompt slots.
        self.entries_per_token = manifest.model["kv_heads"] if manifest.packed else 1
        self.first_slot = (max(manifest.prompt_slots) // self.entries_per_token if manifest.packed else kept[0])
        # [batch, capacity] bool: prompt slots holding a real (non-padding) entry; a step adds its slot.
        length = self.prompt_length = prompt_mask.shape[1]
        self.slot_mask = torch.zeros(prompt_mask.shape[0], max(manifest.capacity), dtype=torch.bool,
                                     device=prompt_mask.device)
        if not manifest.packed:  # packed layers label their entries instead (empty slots: -1)
            self.slot_mask[:, : kept[0]] = prompt_mask[:, length - kept[0]:].bool()

    @staticmethod
    def _in_buffers(layer: SlotState, capacity: int, names: Sequence[str]) -> SlotState:
        """The layer's entries copied into buffers of ``capacity`` slots; the per-layer constants as they are."""
        buffers = {}
        for name in names:
            tensor = getattr(layer, name)
            if name in LOWRANK_NAMES:  # per-layer constants: handed to every step as they are
                buffers[name] = tensor
                continue
            buffer = torch.full((*tensor.shape[:2], capacity, *tensor.shape[3:]), -1 if name == "heads" else 0,
                                dtype=tensor.dtype, device=tensor.device)
            buffer[:, :, : tensor.shape[2]] = tensor
            buffers[name] = buffer
        return SlotState(**buffers)

    def __call__(self, token: Tensor, mask: Tensor) -> Tensor:
        """One step (a ``kvc_compile.lookahead.Step``): ``mask`` is the prompt's grown by the tokens so far."""
        engine = self.engine
        slot = self.first_slot + mask.shape[1] - self.prompt_length - 1
        live = (slot + 1) * self.entries_per_token
        if not engine.manifest.packed:
            self.slot_mask[:, slot] = True  # the slot this step writes
        live_mask = self.slot_mask[:, None, None, :live].contiguous()  # programs read dense inputs
        return engine._decode(token, _last_position(mask), live_mask, torch.tensor([slot], device=engine.device),
                              *self.buffers)


class _RollingSteps:
    """Decode steps over rolling-layout buffers (compression while decoding; see the module docstring)."""

    ENTRY_FILL = {"keys": 0, "values": 0, "positions": -1}

    def __init__(self, engine: Engine, state: Sequence[RollingState], prompt_mask: Tensor, capacity: int,
                 append: Callable, evict: Callable | None = None, target: int | None = None) -> None:
        self.engine, self.append, self.evict, self.target = engine, append, evict, target
        self.capacity = capacity
        self.prompt_length = prompt_mask.shape[1]
        self.layers = [self._at_end(layer) for layer in state]
        self.entries = state[0].keys.shape[2]  # per KV head, padding included: what the compiled path counts
        self.slot_mask = torch.zeros(prompt_mask.shape[0], self.capacity, dtype=torch.bool, device=prompt_mask.device)
        self.slot_mask[:, self.capacity - self.entries:] = prompt_mask[:, self.prompt_length - self.entries:].bool()

    def _at_end(self, layer: RollingState) -> RollingState:
        """The layer's entry tensors padded in front to the capacity (empty slots first); the query
        buffer as it is. Only an evicting step shortens the entries: appending steps' buffers pass
        through uncopied."""
        pad = self.capacity - layer.keys.shape[2]
        if pad == 0:
            return layer
        padded = {}
        for name, fill in self.ENTRY_FILL.items():
            tensor = getattr(layer, name)
            padded[name] = F.pad(tensor, (0, 0, pad, 0) if tensor.dim() == 4 else (pad, 0), value=fill)
        return layer._replace(**padded)

    def __call__(self, token: Tensor, mask: Tensor) -> Tensor:
        """One step (a ``kvc_compile.lookahead.Step``): ``mask`` is the prompt's grown by the tokens so far."""
        engine = self.engine
        step = mask.shape[1] - self.prompt_length - 1
        # The compiled path evicts when a step brings a layer to target_size + decoding_interval.
        evict = self.evict is not None and self.entries + 1 >= self.capacity
        self.slot_mask = torch.cat([self.slot_mask[:, 1:], self.slot_mask.new_ones(len(token), 1)], dim=-1)
        program = self.evict if evict else self.append
        position = torch.tensor([self.prompt_length + step], device=engine.device)
        logits, *state = program(token, _last_position(mask), self.slot_mask[:, None, None, :], position,
                                 *flatten(self.layers, RollingState._fields))
        self.layers = [self._at_end(layer) for layer in unflatten(RollingState, RollingState._fields, state)]
        if evict:
            real = self.slot_mask.sum(-1, keepdim=True).clamp(max=self.target)
            self.slot_mask = torch.arange(self.capacity, device=real.device) >= self.capacity - real
            self.entries = self.target
        else:
            self.entries += 1
        return logits


def _last_position(mask: Tensor) -> Tensor:
    """[batch, 1]: the logical position of each row's newest token (padding does not count)."""
    return mask.cumsum(-1)[:, -1:] - 1


def _prompt_rows(prompts: Prompts) -> list:
    """The batch as a list of prompts: a string, a list of ints or a 1-D tensor is one prompt."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor):
        if prompts.dim() not in (1, 2) or prompts.is_floating_point() or prompts.is_complex():
            raise EngineError(f"token ids as a tensor must be integers, 1-D (one prompt) or 2-D (one row per "
                              f"prompt); got a {prompts.dim()}-D {prompts.dtype} tensor")
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    try:
        rows = list(prompts)
    except TypeError as error:
        raise EngineError(f"prompts must be a string, a list of token ids or a list of either; got "
                          f"{type(prompts).__name__}") from error
    if not rows:
        raise EngineError("no prompts given: pass a prompt (text or a list of token ids) or a list of prompts")
    if all(_is_token_id(item) for item in rows):
        return [rows]  # one prompt's token ids
    if any(isinstance(row, str) for row in rows) and not all(isinstance(row, str) for row in rows):
        raise EngineError("give every prompt as text or every prompt as token ids, not a mix")
    return rows


def _is_token_id(value) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _token_ids(index: int, prompt) -> list[int]:
    """One prompt's token ids as ints; floats, strings and nested lists are refused, not truncated."""
    if isinstance(prompt, Tensor):
        prompt = prompt.tolist() if prompt.dim() == 1 and not prompt.is_floating_point() else [prompt]
    try:
        tokens = list(prompt)
    except TypeError:
        tokens = [prompt]
    for token in tokens:
        if not _is_token_id(token):
            raise EngineError(f"prompt {index}: {token!r} is not a token id (an integer); a prompt is text or a list "
                              f"of token ids")
    return [operator.index(token) for token in tokens]


def _check_sampling(manifest: Manifest, max_new_tokens, temperature, top_k, top_p, seed) -> None:
    capacity = manifest.max_new_tokens
    if not _is_token_id(max_new_tokens) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= capacity:
        more = (f"; rebuild with --max-new-tokens {max_new_tokens} for more"
                if _is_token_id(max_new_tokens) and max_new_tokens > capacity else "")
        raise EngineError(f"max_new_tokens must be an integer in [1, {capacity}] (the engine's decode capacity), got "
                          f"{max_new_tokens!r}{more}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EngineError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise EngineError(f"temperature must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1] (1: no nucleus cut), got {top_p}")
    if not _is_token_id(top_k) or isinstance(top_k, bool) or top_k < 0:
        raise EngineError(f"top_k must be an integer >= 0 (0: no cut), got {top_k!r}")
    if seed is not None and (not _is_token_id(seed) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise EngineError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")


# What kvc::compress_kv warns (kvc_compile.ops.compress.site_inputs) for a prompt it keeps whole. Its
# advice, to lower window_size, is for torch.compile users: an engine's window is fixed when it is built.
def _prefill_notes(caught: list[warnings.WarningMessage], batch: int) -> list[str]:
    """The prefill's warnings: a prompt kept whole becomes one note in engine terms (the op warns once
    per layer, advising an option the engine cannot change); any other warning is shown as it was."""
    notes: list[str] = []
    for warning in caught:
        if not isinstance(warning.message, ShortPromptWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        length, method, window = warning.message.length, warning.message.method, warning.message.window
        prompt = "the prompt is" if batch == 1 else "the batch's longest prompt is"
        note = (f"{prompt} {length} tokens long, not longer than {method}'s observation window of {window} tokens "
                f"built into this engine, so its cache is kept whole (uncompressed); prompts of {window + 1} tokens "
                f"or more are compressed")
        if note not in notes:
            notes.append(note)
    return notes


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def _sampler(temperature: float, top_k: int, top_p: float, generator) -> Callable[[Tensor], Tensor]:
    def pick(logits: Tensor) -> Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k:
            threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return pick


__all__ = ["Engine", "Generation"]
