"""What a compression method is: a scorer, and what it may read.

A method only says how much each cached token is worth (``Method.score``, from ``ScoreInputs``).
The framework turns the scores into kept tokens (``kvc_compile.methods.selection``) and the kept
tokens into a cache layout (``kvc_compile.compression``), so every method gets the same budget
arithmetic, padding rules and static output shapes. A method whose heads or layers keep different
counts says ``layout = "packed"`` (see ``kvc_compile.compression.layout``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvc_compile.methods import scoring
from kvc_compile.methods.kernels import active_kernels
from kvc_compile.methods.rotary import RotaryNotFoundError, unrotate_with
from kvc_compile.methods.selection import EXCLUDED, PROTECTED, select_uniform

LAYOUTS = ("dense", "packed")


class OutputProjectionNotFoundError(ValueError):
    """A method reads the output projection, and the attention site has none the pass could find."""


@dataclass(frozen=True)
class ScoreInputs:
    """Everything a scorer may read for one attention layer at the end of prefill.

    Shapes: ``queries`` [batch, q_heads, n, head_dim] (post-RoPE), ``keys``/``values``
    [batch, kv_heads, n, head_dim] (post-RoPE keys, as cached), ``valid`` [batch, n] bool
    (False at padding positions). ``cos``/``sin`` are the rotary tables the keys were rotated with
    (broadcastable to [batch, 1, n, head_dim]), when the model has them; ``n_layers`` is the number
    of compressed layers.
    """

    queries: Tensor
    keys: Tensor
    values: Tensor
    valid: Tensor
    layer_idx: int
    n_layers: int = 1
    cos: Tensor | None = None
    sin: Tensor | None = None
    # [batch, n] bool: the rows of ``queries`` that hold real queries, when not those of ``valid``.
    # Decode-time compression sets it: only the newest rows hold the buffer of recent queries.
    query_valid: Tensor | None = None
    # [batch, kv_heads, n] int: the logical position of each entry, while decoding (after evictions an
    # entry no longer sits at its position's index).
    positions: Tensor | None = None
    # (cos, sin) [batch, kv_heads, n, head_dim] at each entry's own position, while decoding, for
    # methods that un-rotate keys (``Method.unrotates_keys``); None: ``cos``/``sin`` serve keys too.
    key_tables: tuple[Tensor, Tensor] | None = None
    # [hidden, q_heads * head_dim]: the layer's output projection (``o_proj.weight``), for methods that
    # weigh entries by what their values add to the residual stream (``ReadsOutputProjection``).
    output_weight: Tensor | None = None

    def window_votes(self, window: int) -> Tensor:
        """Attention of the last ``window`` queries over every key, summed over them: [batch, q_heads, n] fp32."""
        kernel = active_kernels().window_votes or scoring.window_votes
        return kernel(self.queries, self.keys, self.valid, window)

    def output_saliency(self, window: int, variant: str) -> Tensor:
        """OBCache's saliency of every key for the last ``window`` queries' outputs: [batch, q_heads, n] fp32."""
        kernel = active_kernels().output_saliency or scoring.window_output_saliency
        return kernel(self.queries, self.keys, self.values, self.valid, window, variant)

    def output_norms(self, who: str = "this method") -> Tensor:
        """``‖W_O^h v_j‖₁`` of every value through its query heads' slices of ``o_proj``, averaged over
        each KV head's group: [batch, kv_heads, n] fp32."""
        if self.output_weight is None:
            raise OutputProjectionNotFoundError(
                f"{who} weighs entries by the output projection (o_proj), but none was found after the attention "
                f"of layer {self.layer_idx}; it supports models whose attention output goes through a linear o_proj "
                f"(Llama, Mistral, Qwen2, Qwen3)"
            )
        return scoring.output_l1_norms(self.values, self.output_weight)

    def _rotary(self, who: str) -> tuple[Tensor, Tensor]:
        if self.cos is None or self.sin is None:
            raise RotaryNotFoundError(
                f"{who} needs pre-RoPE queries/keys, but no rotary embedding was found at this attention "
                f"site (layer {self.layer_idx}); it supports models that apply transformers' rotate_half RoPE "
                f"(Llama, Mistral, Qwen2, Qwen3)"
            )
        return self.cos.float(), self.sin.float()

    def unrotate(self, x: Tensor, who: str = "this method") -> Tensor:
        """Undo RoPE: rotate every position back by its angle (fp32). ``x`` [batch, heads, n, d]."""
        cos, sin = self._rotary(who)
        return unrotate_with(x, cos, sin)

    def unrotate_keys(self, who: str = "this method") -> Tensor:
        """The keys before RoPE (fp32): each entry rotated back by its own position's angle."""
        if self.key_tables is None:
            return self.unrotate(self.keys, who)
        return unrotate_with(self.keys, *self.key_tables)


@dataclass(frozen=True)
class Method(ABC):
    """A scorer: one dataclass per method, its fields are its options.

    The class attributes and hooks below are what the framework reads; their defaults describe a
    plain scorer (uniform budgets at prefill). A method that does more inherits a capability from
    ``kvc_compile.methods.capabilities``, which sets them.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    # "packed" when heads or layers keep different numbers of tokens (``PackedLayout``).
    layout: ClassVar[str] = "dense"
    # Reads pre-RoPE queries/keys: the pass must find the rotary tables (``PreRopeScorer``).
    needs_rotary: ClassVar[bool] = False
    # Un-rotates keys: while decoding it gets the tables of every entry's own position (``UnrotatesKeys``).
    unrotates_keys: ClassVar[bool] = False
    # Compresses at every decoding step too, back to the prefill budget (``CompressesWhileDecoding``).
    compresses_while_decoding: ClassVar[bool] = False
    # Reads the layer's output projection: the pass hands it to the op (``ReadsOutputProjection``).
    needs_output_projection: ClassVar[bool] = False

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> Tensor:
        """Return [batch, kv_heads, n] scores, higher means keep."""

    @property
    def min_uncompressed_length(self) -> int:
        """Prompts this long or shorter are left uncompressed (e.g. shorter than the window)."""
        return 0

    def layer_kept_length(self, n_kept, n, layer_idx: int, n_layers: int):
        """Tokens per KV head that layer ``layer_idx`` keeps when the average is ``n_kept``.

        Must be SymInt-safe (integer arithmetic on ``n`` and ``n_kept`` only); layer-budget methods
        override it.
        """
        return n_kept

    @property
    def queries_read(self) -> int | None:
        """How many of the most recent queries ``score`` reads (0: none), or None for all of them.

        Decode-time compression hands a scorer only a rolling buffer of recent queries, so it
        accepts only methods that say how many they read.
        """
        return None

    @property
    def decoding_queries(self) -> int | None:
        """How many recent queries decode-time compression keeps for ``score`` (None: it cannot
        compress while decoding). Methods that read a window of recent queries read the same window;
        a method that reads every query may instead score from a window while decoding."""
        return self.queries_read

    @property
    def lookahead_queries(self) -> int:
        """Queries per layer a lookahead method (``Lookahead``) keeps for its second stage (0: not one)."""
        return 0

    @property
    def budgets_across_layers(self) -> bool:
        """True when a layer's budget depends on the scores of every layer (``LayerBudgets``)."""
        return False

    def layer_budgets(self, layer_scores: list[Tensor], valid: Tensor, n_kept: int) -> Tensor:
        """[batch, n_layers] tokens per KV head each layer keeps, from all layers' scores.

        Only for methods whose ``budgets_across_layers`` is True; the layers' total should be
        ``n_layers * n_kept``, the same as uniform budgets.
        """
        raise NotImplementedError(f"{self.name} gives every layer its budget on its own (layer_kept_length)")

    def select(self, scores: Tensor, valid: Tensor, n_kept) -> Tensor:
        """Indices of kept tokens: dense [batch, kv_heads, n_kept] positions, or packed
        [batch, kv_heads * n_kept] flat indices ``head * n + position`` (see ``select_head_adaptive``)."""
        return select_uniform(scores, valid, n_kept)

    def check_model(self, model) -> None:
        """Refuse a model this method's options were not made for (a calibration file of another
        model); the compiled and the reference paths both call it. Most methods fit any model."""
        return None

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def check_decoding_window(method: str, window: int, minimum: int = 1) -> None:
    """Refuse a ``decoding_window`` (recent queries a method scores from while decoding) below ``minimum``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < minimum:
        raise ValueError(f"{method}: decoding_window must be an integer >= {minimum} (the recent queries it scores "
                         f"from while decoding), got {window!r}")


def gqa_mean(per_query_head: Tensor, kv_heads: int) -> Tensor:
    """Average [batch, q_heads, n] scores over each GQA group -> [batch, kv_heads, n]."""
    batch, q_heads, n = per_query_head.shape
    return per_query_head.view(batch, kv_heads, q_heads // kv_heads, n).mean(dim=2)


def gqa_max(per_query_head: Tensor, kv_heads: int) -> Tensor:
    """Max of [batch, q_heads, n] scores over each GQA group -> [batch, kv_heads, n]."""
    batch, q_heads, n = per_query_head.shape
    return per_query_head.view(batch, kv_heads, q_heads // kv_heads, n).amax(dim=2)


def positions_from_first_valid(valid: Tensor) -> Tensor:
    """Position of each token counted from the row's first real token ([batch, n], padding < 0)."""
    return valid.long().cumsum(dim=-1) - 1


def valid_first_order(valid: Tensor) -> Tensor:
    """[batch, n] permutation putting each row's real tokens first, in their original order."""
    return torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices


def kv_heads_view(x: Tensor, kv_heads: int) -> Tensor:
    """Broadcast a [batch, n] tensor to [batch, kv_heads, n]."""
    return x[:, None, :].expand(-1, kv_heads, -1)


__all__ = [
    "EXCLUDED",
    "LAYOUTS",
    "PROTECTED",
    "Method",
    "ScoreInputs",
    "check_decoding_window",
    "gqa_max",
    "gqa_mean",
    "kv_heads_view",
    "positions_from_first_valid",
    "valid_first_order",
]
