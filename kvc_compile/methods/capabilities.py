"""What a method can do besides scoring prompt tokens for a uniform budget, one small class each.

A plain ``Method`` scores a layer's prompt entries and keeps the same count for every KV head. A
method that does more inherits the capability, which sets what the framework reads
(``layout``, ``needs_rotary``, ...) and names the hooks it must implement, so a method's class line
says everything it needs (``class LAVa(LayerBudgets, SnapKV)``):

* ``PackedLayout``: heads or layers keep different counts (AdaKV, PyramidKV): the cache is stored
  packed (``kvc_compile.compression.layout``) and ``select`` returns flat ``head * n + position`` indices.
* ``LayerBudgets``: a layer's budget depends on every layer's scores (LAVa): ``layer_budgets``.
* ``PreRopeScorer``: reads queries or keys before RoPE (Expected Attention); ``UnrotatesKeys``:
  rotates cached keys back, so while decoding each entry needs its own position's tables (Compactor).
* ``ReadsOutputProjection``: weighs entries by what their values add through ``o_proj``
  (CriticalKV): ``ScoreInputs.output_norms``.
* ``CompressesWhileDecoding``: evicts at every decoding step, back to the budget (MorphKV).
* ``Lookahead``: re-scores the prompt after rolling out pseudo tokens (LAQ): ``lookahead_queries``,
  ``lookahead_scores``.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from kvc_compile.methods.base import Method


class PackedLayout(Method):
    layout = "packed"


class LayerBudgets(PackedLayout):
    @property
    def budgets_across_layers(self) -> bool:
        return True

    @abstractmethod
    def layer_budgets(self, layer_scores: list[Tensor], valid: Tensor, n_kept: int) -> Tensor:
        """[batch, n_layers] tokens per KV head each layer keeps, from all layers' scores; the layers'
        total should be ``n_layers * n_kept``, the same as uniform budgets."""


class PreRopeScorer(Method):
    needs_rotary = True


class UnrotatesKeys(PreRopeScorer):
    unrotates_keys = True


class ReadsOutputProjection(Method):
    needs_output_projection = True


class CompressesWhileDecoding(Method):
    compresses_while_decoding = True


class Lookahead(Method):
    @property
    @abstractmethod
    def lookahead_queries(self) -> int:
        """Queries per layer kept for the second stage: the last prompt window, then the pseudo tokens."""

    @abstractmethod
    def lookahead_scores(self, keys: Tensor, valid: Tensor, voters: Tensor, voter_valid: Tensor) -> Tensor:
        """Stage-2 scores [batch, kv_heads, n] of the prompt ``keys`` by the buffered ``voters``."""


__all__ = [
    "CompressesWhileDecoding",
    "LayerBudgets",
    "Lookahead",
    "PackedLayout",
    "PreRopeScorer",
    "ReadsOutputProjection",
    "UnrotatesKeys",
]
