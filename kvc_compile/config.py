"""The one validated configuration of a compression run.

``CompressionConfig.from_options`` takes the ``options`` dict of ``torch.compile(...,
backend="kvc", options=...)``. Every problem is reported before anything is traced or compiled,
with the valid choices in the message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Any

import torch

from kvc_compile.methods import Method, build_method, list_methods, method_class

INNER_BACKENDS = ("inductor", "eager")
COMMON_OPTIONS = ("method", "compression_ratio", "budget", "inner_backend")


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how much.

    ``compression_ratio`` is the fraction of prompt tokens removed (kvpress convention: 0.75 keeps
    25%); ``budget`` the absolute number of tokens kept per KV head. Give exactly one. Method
    options (window size, pooling, sinks, seed, ...) go in ``method_options``.
    """

    method: str
    compression_ratio: float | None = None
    budget: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    inner_backend: str = "inductor"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ValueError(f"method must be a method name (a string), got {self.method!r}; valid methods: "
                             f"{', '.join(list_methods())}")
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
        if self.inner_backend not in INNER_BACKENDS:
            raise ValueError(
                f"unknown inner_backend {self.inner_backend!r}; valid choices: {', '.join(INNER_BACKENDS)}"
            )
        self.build_method()  # unknown or invalid method options fail here

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
        options = dict(options)
        if "method" not in options:
            raise ValueError(f"options must name a 'method'; valid methods: {', '.join(list_methods())}")
        method = options.pop("method")
        common = {key: options.pop(key) for key in COMMON_OPTIONS[1:] if key in options}
        return cls(method=method, method_options=options, **common)

    def build_method(self) -> Method:
        return build_method(self.method, self.method_options, common_options=COMMON_OPTIONS)

    @cached_property
    def method_impl(self) -> Method:
        return self.build_method()

    def to_spec(self) -> str:
        """A canonical string that travels inside the compiled graph as the custom op's argument."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_spec(spec: str) -> CompressionConfig:
        return _config_from_spec(spec)

    def kept_length(self, n: int | torch.SymInt) -> int | torch.SymInt:
        """Tokens kept per KV head for an ``n``-token prompt (works on symbolic lengths too).

        ``floor(n * (1 - compression_ratio))`` (at least 1) or ``min(budget, n)``; prompts no longer
        than the method's observation window are left whole.
        """
        if n <= self.method_impl.min_uncompressed_length:
            return n
        if self.budget is not None:
            return torch.sym_min(n, self.budget)
        keep = Fraction(1 - self.compression_ratio).limit_denominator(1 << 20)
        return torch.sym_max((n * keep.numerator) // keep.denominator, 1)


@lru_cache(maxsize=64)
def _config_from_spec(spec: str) -> CompressionConfig:
    return CompressionConfig(**json.loads(spec))


