"""The registry of methods by name, and building one from user options."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvc_compile.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


# Rank compression (KQ-SVD) is not a token method: it thins every entry and has no scorer, so it is
# not in the registry, but ``method=`` accepts it (``kvc_compile.config``).
LOWRANK_METHOD = "kqsvd"


def list_token_methods() -> list[str]:
    """Names of every registered token-eviction method (the scorers; ``list_methods`` adds ``kqsvd``)."""
    return sorted(METHODS)


def list_methods() -> list[str]:
    """Every name ``method=`` accepts: the token-eviction methods and rank compression (``kqsvd``)."""
    return sorted([*METHODS, LOWRANK_METHOD])


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}") from None


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def build_method(name: str, options: dict[str, Any], common_options: tuple[str, ...] = ()) -> Method:
    """Instantiate a method from user options, checking names and types against its dataclass fields."""
    cls = method_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r}; valid options: "
            f"{', '.join(list(common_options) + list(fields))}"
        )
    for option, value in options.items():
        default = _default(fields[option])
        expected = float if isinstance(default, float) else type(default)
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # 1 is a fine value for a float option
        if not ok:
            raise ValueError(f"{name}: option {option!r} must be of type {expected.__name__}, got {value!r}")
    return cls(**options)
