"""One layer's cache state in an engine, as named records.

The exported programs take and return their state as flat tensor lists (what ``torch.export``,
AOTInductor and ONNX see): per layer the record's tensors in the order of the names the manifest
records (``state_names``). ``flatten`` and ``unflatten`` convert at that boundary; everything else
reads the tensors by name.

``SlotState``: the slot layout decoding writes in place (``keys, values``, then ``heads`` for the
packed layout, then the KQ-SVD factors); the prefill returns it with the kept entries' positions.
``RollingState``: the rolling layout (compression while decoding, LAQ's rollout). ``LookaheadState``:
what LAQ's prefill returns, the stage-1 cache with the full prompt entries for stage 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

if TYPE_CHECKING:
    from torch import Tensor


class SlotState(NamedTuple):
    """A layer's cache in the slot layout; the fields a layout does not use are None."""

    keys: Tensor
    values: Tensor
    heads: Tensor | None = None  # packed layout: the KV head of each entry, -1 for an empty slot
    # KQ-SVD: the calibrated factors and the output projection folded with the value lift, the same
    # for every prompt and step (no batch axis).
    key_down: Tensor | None = None
    key_up: Tensor | None = None
    value_down: Tensor | None = None
    value_up: Tensor | None = None
    output_fold: Tensor | None = None
    positions: Tensor | None = None  # returned by the prefill only: the kept entries' positions


class RollingState(NamedTuple):
    """A layer's cache in the rolling layout: a fixed number of slots, the entries ending at the last
    one; a step drops the oldest slot and appends the new entry."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    recent_queries: Tensor  # the last queries, which decode-time scorers and LAQ's stage 2 vote with


class LookaheadState(NamedTuple):
    """What LAQ's prefill returns per layer: the stage-1 cache, the full prompt entries and the
    buffer of recent queries."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    prompt_keys: Tensor
    prompt_values: Tensor
    recent_queries: Tensor

    def stage1(self) -> RollingState:
        """The stage-1 cache in the rolling layout, which LAQ's rollout decodes on."""
        return RollingState(self.keys, self.values, self.positions, self.recent_queries)


class Stage2Input(NamedTuple):
    """What LAQ's stage-2 program re-scores per layer: the full prompt and the buffered queries."""

    prompt_keys: Tensor
    prompt_values: Tensor
    recent_queries: Tensor


class Stage2Output(NamedTuple):
    """What LAQ's stage-2 program returns per layer: the cache decoding starts from."""

    keys: Tensor
    values: Tensor
    positions: Tensor


LOWRANK_NAMES = ("key_down", "key_up", "value_down", "value_up", "output_fold")
Record = TypeVar("Record", bound=tuple)


def state_record(state_names: Sequence[str]) -> type[SlotState] | type[RollingState]:
    """The record of a decode state named ``state_names`` (a manifest's)."""
    return RollingState if tuple(state_names) == RollingState._fields else SlotState


def prefill_names(state_names: Sequence[str]) -> tuple[str, ...]:
    """What a prefill program returns per layer for a decode state named ``state_names``: the state
    and the kept entries' positions (which the rolling layout holds already)."""
    return tuple(state_names) if "positions" in state_names else (*state_names, "positions")


def flatten(layers: Iterable[tuple], names: Sequence[str]) -> list[Tensor]:
    """Every layer's tensors named ``names``, layer by layer: a program's flat state."""
    return [getattr(layer, name) for layer in layers for name in names]


def unflatten(record: type[Record], names: Sequence[str], tensors: Sequence[Tensor]) -> list[Record]:
    """A program's flat state as one ``record`` per layer, each of ``len(names)`` tensors."""
    per_layer = len(names)
    if len(tensors) % per_layer:
        raise ValueError(f"{len(tensors)} state tensors are not a whole number of layers of {per_layer}")
    return [record(**dict(zip(names, tensors[start:start + per_layer], strict=True)))
            for start in range(0, len(tensors), per_layer)]


__all__ = ["LOWRANK_NAMES", "LookaheadState", "RollingState", "SlotState", "Stage2Input", "Stage2Output", "flatten",
           "prefill_names", "state_record", "unflatten"]
