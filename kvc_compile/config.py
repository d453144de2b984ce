"""The one validated configuration of a compression run.

``CompressionConfig.from_options`` takes the ``options`` dict of ``torch.compile(...,
backend="kvc", options=...)``. Every problem is reported before anything is traced or compiled,
with the valid choices in the message.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch

from kvc_compile.methods import LOWRANK_METHOD, Method, build_method, list_methods, list_token_methods, method_class

INNER_BACKENDS = ("inductor", "eager")
COMMON_OPTIONS = (
    "method", "compression_ratio", "budget", "inner_backend", "decoding_interval", "target_size", "verbose",
    "tune_decode", "kqsvd",
)
# Rank compression: alone as method="kqsvd" (options at the top level), or next to a token method
# as kqsvd={...}.
LOWRANK_OPTIONS = ("projections", "key_rank", "value_rank")
CALIBRATE_HINT = "produce one with: kvc-calibrate --model MODEL --out projections.safetensors"


def decoding_problem(method: Method) -> str | None:
    """Why ``method`` cannot compress while decoding, or None when it can."""
    if method.lookahead_queries:
        return "its second stage runs once, after the lookahead rollout"
    if method.budgets_across_layers:
        return ("its layer budgets come from every layer's scores at once, and decoding evicts each layer on its own "
                "(lava: layer_allocation='uniform' keeps the heads' shared budgets and compresses while decoding)")
    if method.needs_output_projection:
        return "it weighs entries by the layer's output projection (o_proj), which only prefill hands the op"
    if method.decoding_queries is None:
        return "it reads every query of the sequence, and decoding keeps only a window of recent ones"
    return None


def _decodes_by_default(name: str) -> bool:
    """Whether method ``name`` with its default options can compress while decoding."""
    try:
        return decoding_problem(method_class(name)()) is None
    except ValueError:  # a method that needs an option (a calibration file) cannot be built bare
        return False


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how much.

    ``compression_ratio`` is the fraction of prompt tokens removed (kvpress convention: 0.75 keeps
    25%); ``budget`` the absolute number of tokens kept per KV head. Give exactly one. Method
    options (window size, pooling, sinks, seed, ...) go in ``method_options``. ``lowrank`` adds
    KQ-SVD rank compression of every cached entry; ``method="kqsvd"`` uses it alone.

    ``decoding_interval`` and ``target_size`` compress during decoding too: whenever a layer has
    grown to ``target_size + decoding_interval`` entries per KV head, the method's scorer (fed the
    queries of the most recent tokens) brings it back to ``target_size``. MorphKV does this at
    every step, back to ``budget``.

    ``tune_decode`` compiles decode graphs with Inductor's max-autotune and frozen weights
    (``kvc_compile.backend.tuning``): slower to compile, faster to decode on the CPU.
    """

    method: str
    compression_ratio: float | None = None
    budget: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    inner_backend: str = "inductor"
    decoding_interval: int | None = None
    target_size: int | None = None
    # KQ-SVD rank compression: {"projections": file, "key_rank": int | None, "value_rank": int | None}.
    lowrank: dict[str, Any] | None = None
    # A line on stderr per compilation (what is compiled, how long it took); not part of the spec.
    # KVC_VERBOSE=0 in the environment turns it off too.
    verbose: bool = field(default=True, compare=False)
    # Decode graphs compiled with Inductor's max-autotune and frozen weights (``kvc_compile.backend.tuning``);
    # how the graph is compiled, not what it compresses, so not part of the spec either.
    tune_decode: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ValueError(f"method must be a method name (a string), got {self.method!r}; valid methods: "
                             f"{', '.join(list_methods())}")
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(
                f"unknown inner_backend {self.inner_backend!r}; valid choices: {', '.join(INNER_BACKENDS)}"
            )
        if not isinstance(self.verbose, bool):
            raise ValueError(f"verbose must be True or False (a line on stderr per compilation), got {self.verbose!r}")
        if not isinstance(self.tune_decode, bool):
            raise ValueError(f"tune_decode must be True or False (decode graphs compiled with Inductor's max-autotune "
                             f"and frozen weights), got {self.tune_decode!r}")
        if self.lowrank is not None:
            check_lowrank_options(self.lowrank)
            self.projections  # noqa: B018  (reads the file: ranks above its head_dim fail here)
        if not self.evicts:
            if self.lowrank is None:
                raise ValueError(f"kqsvd projects keys and values on calibrated factors and needs a file of them: "
                                 f"options={{'method': 'kqsvd', 'projections': FILE}}; {CALIBRATE_HINT}")
            evicting = (self.compression_ratio, self.budget, self.decoding_interval, self.target_size)
            if any(option is not None for option in evicting) or self.method_options:
                raise ValueError(
                    "kqsvd alone keeps every token (it thins entries to rank R) and takes only projections, "
                    "key_rank and value_rank (not compression_ratio, budget, decoding_interval, target_size or "
                    "method options); to evict tokens as well, name a token method and add "
                    "kqsvd={'projections': FILE}, e.g. {'method': 'snapkv', 'compression_ratio': 0.5, 'kqsvd': {...}}"
                )
            return
        method_class(self.method)  # unknown method -> ValueError listing the valid ones
        if (self.compression_ratio is None) == (self.budget is None):
            given = "both" if self.compression_ratio is not None else "neither"
            raise ValueError(
                f"give exactly one of compression_ratio (fraction of tokens removed, in [0, 1)) or "
                f"budget (tokens kept per KV head); got {given}"
            )
        if self.compression_ratio is not None:
            ratio = self.compression_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
                raise ValueError(
                    f"compression_ratio must be a number in [0, 1) (the fraction of tokens removed), "
                    f"got {ratio!r}"
                )
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0
        ):
            raise ValueError(f"budget must be a positive integer (tokens kept per KV head), got {self.budget!r}")
        self.build_method()  # unknown or invalid method options fail here
        self._check_decoding_compression()

    def _check_decoding_compression(self) -> None:
        method = self.method_impl
        for option in ("decoding_interval", "target_size"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{option} must be a positive integer (tokens per KV head), got {value!r}")
        if method.compresses_while_decoding:
            if self.target_size is None and self.budget is None:
                raise ValueError(
                    f"{self.method} keeps a constant-size cache: give budget (the entries kept per KV head, "
                    f"prompt and generated tokens together), not compression_ratio, e.g. "
                    f"{{'method': '{self.method}', 'budget': 512}}"
                )
        elif (self.decoding_interval is None) != (self.target_size is None):
            raise ValueError(
                "compression while decoding needs both decoding_interval (compress every this many generated "
                "tokens) and target_size (entries per KV head kept then); got only one of them"
            )
        if self.decode_target is None:
            return
        problem = decoding_problem(method)
        if problem is None and self.lowrank is not None:
            raise ValueError(
                f"{self.method} cannot compress while decoding next to kqsvd: the entries are stored at rank R, "
                f"which the scorers do not read; compress the prompt only (drop decoding_interval and "
                f"target_size), or drop kqsvd"
            )
        if problem is not None:
            able = [name for name in list_token_methods() if _decodes_by_default(name)]
            raise ValueError(
                f"{self.method} cannot compress while decoding: {problem}. Methods that can: {', '.join(able)}"
            )
        window = method.decoding_queries
        if self.decode_target <= window:
            what = "which is always kept" if method.queries_read is not None else "which it scores from"
            raise ValueError(
                f"target_size ({self.decode_target}) must exceed {self.method}'s window of recent tokens "
                f"({window}), {what}"
            )

    @property
    def decode_target(self) -> int | None:
        """Entries per KV head that decode-time compression brings a layer back to (None: it does not)."""
        if not self.evicts:
            return None
        if self.target_size is not None:
            return self.target_size
        return self.budget if self.method_impl.compresses_while_decoding else None

    @property
    def decode_threshold(self) -> int | None:
        """Entries per KV head at which a layer is compressed while decoding: ``target_size +
        decoding_interval`` (MorphKV: ``budget + 1``, every step); None when it never is."""
        target = self.decode_target
        return None if target is None else target + (self.decoding_interval or 1)

    def layer_decode_target(self, layer_idx: int, n_layers: int) -> int:
        """Entries per KV head (packed: on average over the heads) that decode-time compression brings
        layer ``layer_idx`` back to: ``target_size``, or the layer's share of ``n_layers * target_size``
        for layer-budget methods (PyramidKV). No layer's share is cut short by a prompt length: the
        length handed to the method (every layer's target together) exceeds any one share."""
        target = self.decode_target
        return self.method_impl.layer_kept_length(target, n_layers * target, layer_idx, n_layers)

    def evicts_while_decoding(self, entries_per_head, layer_idx: int, n_layers: int) -> bool:
        """Whether a layer holding ``entries_per_head`` is compressed at this step: it has grown to its
        target plus ``decoding_interval`` (MorphKV: plus 1, every step). SymInt-safe (specialises)."""
        if self.decode_target is None:
            return False
        return bool(entries_per_head >= self.layer_decode_target(layer_idx, n_layers) + (self.decoding_interval or 1))

    @property
    def recent_queries(self) -> int:
        """Queries of the most recent tokens each layer keeps for decode-time scoring or for LAQ's
        second stage (0: none)."""
        if not self.evicts:
            return 0
        if self.decode_target is None:
            return self.method_impl.lookahead_queries
        return max(self.method_impl.decoding_queries, 1)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> CompressionConfig:
        """Build from a flat options dict: common keys plus the method's own options."""
        if not options:
            raise ValueError(
                f"the kvc backend needs options, e.g. options={{'method': 'snapkv', 'compression_ratio': 0.5}}; "
                f"valid methods: {', '.join(list_methods())}"
            )
        if isinstance(options, CompressionConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict like {{'method': 'snapkv', 'compression_ratio': 0.5}}, "
                             f"got {options!r}")
        options = dict(options)
        if "method" not in options:
            raise ValueError(f"options must name a 'method'; valid methods: {', '.join(list_methods())}")
        method = options.pop("method")
        common = {key: options.pop(key) for key in COMMON_OPTIONS[1:-1] if key in options}
        lowrank = options.pop(LOWRANK_METHOD, None)
        if method == LOWRANK_METHOD:
            if lowrank is not None:
                raise ValueError("with method='kqsvd', give projections/key_rank/value_rank at the top level")
            lowrank = {key: options.pop(key) for key in LOWRANK_OPTIONS if key in options}
        elif isinstance(lowrank, (str, Path)):
            lowrank = {"projections": lowrank}
        if lowrank is not None:
            lowrank = {**dict.fromkeys(LOWRANK_OPTIONS[1:]), **lowrank}
            if isinstance(lowrank.get("projections"), Path):
                lowrank["projections"] = str(lowrank["projections"])
        return cls(method=method, method_options=options, lowrank=lowrank, **common)

    @property
    def evicts(self) -> bool:
        """False for rank compression alone (method="kqsvd"): every token is kept."""
        return self.method != LOWRANK_METHOD

    @cached_property
    def projections(self):
        """The calibrated ``LowRankProjections`` at the configured ranks, or None."""
        if self.lowrank is None:
            return None
        path = self.lowrank["projections"]
        # The file's modification time is part of the cache key: a recalibrated file is read again.
        return _load_projections(path, Path(path).stat().st_mtime_ns, self.lowrank["key_rank"],
                                 self.lowrank["value_rank"])

    def build_method(self) -> Method | None:
        if not self.evicts:
            return None
        return build_method(self.method, self.method_options, common_options=COMMON_OPTIONS)

    @cached_property
    def method_impl(self) -> Method | None:
        """The token method (None for kqsvd alone)."""
        return self.build_method()

    def to_spec(self) -> str:
        """A canonical string that travels inside the compiled graph as the custom op's argument
        (what compresses, not how the compilation reports itself)."""
        spec = dataclasses.asdict(self)
        del spec["verbose"], spec["tune_decode"]
        return json.dumps(spec, sort_keys=True)

    @property
    def reports_progress(self) -> bool:
        """Whether each compilation prints a line on stderr (``verbose``, unless KVC_VERBOSE=0)."""
        return self.verbose and os.environ.get("KVC_VERBOSE", "1").strip().lower() not in ("0", "false", "no", "off")

    def check_model(self, model) -> None:
        """Refuse a model this configuration was not made for: KQ-SVD projections calibrated on another
        model (``CalibrationMismatchError``). The compiled and the reference paths both call it."""
        if self.lowrank is None and not self.evicts:
            return
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # the weights are hashed: real tensors, even inside a compile
            if self.lowrank is not None:
                self.projections.check_model(model, self.lowrank["projections"])
            if self.evicts:
                self.method_impl.check_model(model)

    @staticmethod
    def from_spec(spec: str) -> CompressionConfig:
        return _config_from_spec(spec)

    def kept_length(self, n: int | torch.SymInt) -> int | torch.SymInt:
        """Tokens kept per KV head for an ``n``-token prompt (works on symbolic lengths too).

        ``floor(n * (1 - compression_ratio))`` (at least 1) or ``min(budget, n)``; prompts no longer
        than the method's observation window are left whole.
        """
        if not self.evicts or n <= self.method_impl.min_uncompressed_length:
            return n
        if self.budget is not None:
            return torch.sym_min(n, self.budget)
        keep = Fraction(1 - self.compression_ratio).limit_denominator(1 << 20)
        return torch.sym_max((n * keep.numerator) // keep.denominator, 1)


def check_lowrank_options(lowrank: dict[str, Any]) -> None:
    if not isinstance(lowrank, dict):
        raise ValueError(f"kqsvd options must be a dict like {{'projections': FILE, 'key_rank': 32}}, got {lowrank!r}")
    unknown = sorted(set(lowrank) - set(LOWRANK_OPTIONS))
    if unknown:
        raise ValueError(f"unknown kqsvd option(s) {', '.join(map(repr, unknown))}; valid options: "
                         f"{', '.join(LOWRANK_OPTIONS)}")
    path = lowrank.get("projections")
    if not isinstance(path, str) or not Path(path).is_file():
        raise ValueError(f"kqsvd needs a calibrated projections file; {path!r} is not one ({CALIBRATE_HINT}), "
                         f"then pass projections='projections.safetensors'")
    for option in LOWRANK_OPTIONS[1:]:
        rank = lowrank.get(option)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"kqsvd: {option} must be a positive integer (at most head_dim) or None "
                             f"(the calibrated per-layer ranks), got {rank!r}")


@lru_cache(maxsize=8)
def _load_projections(path: str, mtime_ns: int, key_rank: int | None, value_rank: int | None):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from kvc_compile.compression.lowrank import LowRankProjections

    with unset_fake_temporarily():  # may first be needed inside a fake implementation
        return LowRankProjections.load(path).truncated(key_rank, value_rank)


@lru_cache(maxsize=64)
def _config_from_spec(spec: str) -> CompressionConfig:
    return CompressionConfig(**json.loads(spec))


