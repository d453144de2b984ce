"""What every command shares: user errors end in one line and exit 2, options parse one way.

A command's ``main`` is wrapped with :func:`user_errors`; anything it raises from
:data:`USER_ERRORS` is a problem with the user's input and is printed as ``kvc-xxx: error: ...``
on stderr, never as a traceback (``KVC_DEBUG=1`` shows it). Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

#: The ``--dtype`` choices of the commands that load a model.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad input to a command: the message names the problem and the fix."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here so that `kvc-xxx --help` stays fast and cli.common has no import-time cycle.
    from kvc_compile.engine.manifest import EngineError
    from kvc_compile.models import ModelNotFoundError
    from kvc_compile.passes.manager import NoAttentionSiteError
    from kvc_compile.passes.prefill_compression import CacheLayoutError

    return (UsageError, EngineError, ModelNotFoundError, NoAttentionSiteError, CacheLayoutError, ValueError,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, UnicodeDecodeError)


def user_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a command's ``main``: user errors print one line on stderr and return 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except _user_error_types() as error:
                if os.environ.get("KVC_DEBUG"):  # the whole traceback, when a one-line error hides a bug
                    raise
                print(f"{prog}: error: {describe(error)}", file=sys.stderr)
                return 2
            except torch._dynamo.exc.BackendCompilerFailed as error:
                # The kvc pass refusing a model or cache (e.g. CacheLayoutError) reaches here wrapped by Dynamo.
                inner = getattr(error, "inner_exception", None)
                if not isinstance(inner, _user_error_types()) or os.environ.get("KVC_DEBUG"):
                    raise
                print(f"{prog}: error: {describe(inner)}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap


def describe(error: BaseException) -> str:
    """One line for a user error; file errors name the file."""
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, OSError) and error.filename is not None and not str(error).startswith(str(error.filename)):
        return f"{error.filename}: {error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


def parse_option(item: str) -> tuple[str, object]:
    """``KEY=VALUE``: an int, a float, ``true``/``false``, a JSON object or list (nested options), else a string."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UsageError(f"--option {item!r} must look like KEY=VALUE, e.g. --option window_size=32")
    for cast in (int, float):
        try:
            parsed = cast(value)
        except ValueError:
            continue
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise UsageError(f"--option {key}={value}: the value must be a finite number")
        return key, parsed
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    if value.lstrip().startswith(("{", "[")):
        try:
            return key, json.loads(value)
        except json.JSONDecodeError as error:
            raise UsageError(f"--option {key}: {value!r} is not valid JSON ({error.msg}), e.g. "
                             f"--option 'kqsvd={{\"projections\": \"smollm2.safetensors\"}}'") from error
    return key, value


def parse_options(items: list[str]) -> dict[str, object]:
    return dict(parse_option(item) for item in items)


def read_text_file(path: str | Path, flag: str) -> str:
    """A prompt or settings file as UTF-8 text; a missing or non-UTF-8 file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                         f"convert it, e.g. iconv -t UTF-8") from error


def check_device(name: str) -> torch.device:
    """A device this torch build can use, else a message saying which ones it can."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r} is not a device name; use cpu or cuda") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch build ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from "
                         f"0; use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return device


def positive_int(flag: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag} must be {'0 or more' if allow_zero else 'at least 1'}, got {value}")


def finite_float(flag: str, value: float | None, low: float | None = None, high: float | None = None) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(f"{flag} must be in [{low}, {high}], got {value}")


def check_out_parent(out: str | Path, flag: str = "--out") -> None:
    """Refuse an output whose parent folder does not exist, before any work is done."""
    parent = Path(out).absolute().parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: its parent folder {parent} does not exist; create it first")


def check_out_dir(out: str | Path, flag: str = "--out") -> None:
    """An output folder that is created if missing: refuse, before any work, a file in its place or
    an ancestor that is a file or not writable."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a folder; pass a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {out}: {existing} is a file, so the folder cannot be created there")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{flag} {out}: {existing} is not writable")
