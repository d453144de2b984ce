"""Low-rank (KQ-SVD) passes: store every prefill cache entry at rank R after any token eviction
(``ProjectCacheToLowRank``); in decode graphs, fold the value lift into ``o_proj``
(``FoldValueProjection``) and fuse RoPE into the projection of each new key
(``FuseRopeIntoLowRankProjection``)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

import kvc_compile.ops.kernels  # noqa: F401  (registers torch.ops.kvc.rope_lowrank_project)
from kvc_compile.compression.lowrank import FACTOR_NAMES
from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import AttentionSite, fake_value, linear_weight, output_projection
from kvc_compile.passes.base import GraphPass, RewriteRecord
from kvc_compile.passes.prefill_compression import (
    CacheLayoutError,
    getitems,
    propagate_meta,
    rotary_tables,
)
from kvc_compile.transformers_compat import CACHE_ARG

FACTORS_MARKER = {torch.ops.kvc.lowrank_factors.default, torch.ops.kvc.lowrank_factors}



def factor_markers(k_rope: fx.Node | None) -> list[fx.Node] | None:
    """The five getitems of ``kvc.lowrank_factors(k_rope)``, if the cache records factors."""
    if k_rope is None:
        return None
    for user in k_rope.users:
        if user.op == "call_function" and user.target in FACTORS_MARKER:
            items = {u.args[1]: u for u in user.users if u.target is operator.getitem}
            return [items.get(index) for index in range(5)]
    return None


class ProjectCacheToLowRank(GraphPass):
    """Rewire each prefill site's stored keys and values to their rank-R projections.

    Before (what the cache stores for one layer, as the eviction passes left it in the record)::

        return (..., kept_keys, kept_values, positions, heads, *kvc.lowrank_factors(k_rope), ...)

    After::

        return (..., kvc.lowrank_project(kept_keys, heads?, key_down),
                     kvc.lowrank_project(kept_values, heads?, value_down), positions, heads,
                     *kvc.calibrated_factors(keys, spec, layer),
                     kvc.fold_output_projection(o_proj.weight, value_up), ...)

    ``heads?`` is the packed entries' head labels (None: dense layout). The factors come from
    ``kvc.calibrated_factors`` (the calibrated projections at the configured ranks, on the device of
    ``keys``); returning them is how the cache gets them, so decoding projects new entries and queries
    the same way (``CompressedLayer.update``, the ``"kvc"`` attention). Where ``o_proj`` is not found,
    the fifth factor stays the empty marker and decode lifts attention outputs back instead of
    folding. Prefill attention still reads the full keys and values.
    """

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return config.lowrank is not None

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        prefill_sites = record.prefill_sites
        projections = self.config.projections
        if prefill_sites and len(prefill_sites) != len(projections.key_down):
            raise CacheLayoutError(
                f"kvc: the projections file {self.config.lowrank['projections']} has {len(projections.key_down)} "
                f"layers but the model has {len(prefill_sites)} attention layers: calibrate on this model "
                f"(kvc-calibrate --model MODEL --out FILE)"
            )
        graph, output = gm.graph, gm.graph.output_node()
        for index, site in enumerate(prefill_sites):
            markers = factor_markers(site.new_keys)
            if markers is None or any(m is None for m in markers[:4]):
                raise CacheLayoutError(
                    "kvc: kqsvd stores rank-R entries, which only kvc_compile.CompressedCache holds: call the "
                    f"model with {CACHE_ARG}=kvc_compile.CompressedCache() (and attn_implementation='kvc')"
                )
            _, kv_heads, _, head_dim = fake_value(site.cached_keys).shape
            factors = [getattr(projections, name)[index] for name in FACTOR_NAMES]
            if tuple(factors[0].shape[:2]) != (kv_heads, head_dim):
                raise CacheLayoutError(
                    f"kvc: the projections file {self.config.lowrank['projections']} was calibrated for "
                    f"{factors[0].shape[0]} KV heads of dimension {factors[0].shape[1]}, but attention layer "
                    f"{site.layer_idx} has {kv_heads} of dimension {head_dim}: calibrate on this model"
                )
            constants = self._factors(graph, site, index)
            constants.append(self._folded_output(graph, site, constants[3], markers[4]))
            for marker, constant in zip(markers, constants, strict=True):
                output.replace_input_with(marker, constant)
            rewrite = record.of(site)
            for tensor, down in ((rewrite.stored_keys, constants[0]), (rewrite.stored_values, constants[2])):
                args = (tensor, rewrite.stored_heads, down)
                with graph.inserting_before(output):
                    projected = graph.call_function(torch.ops.kvc.lowrank_project.default, args)
                propagate_meta(projected, torch.ops.kvc.lowrank_project.default, args)
                output.replace_input_with(tensor, projected)
        return len(prefill_sites)

    @staticmethod
    def _folded_output(graph: fx.Graph, site: AttentionSite, value_up: fx.Node, marker: fx.Node | None) -> fx.Node:
        """``kvc.fold_output_projection(o_proj.weight, value_up)``, or the empty marker when ``o_proj``
        is not found (decode then lifts outputs back instead of folding)."""
        linear = output_projection(site.attention)
        if linear is None or marker is None:
            return marker
        op, args = torch.ops.kvc.fold_output_projection.default, (linear_weight(linear), value_up)
        with graph.inserting_before(graph.output_node()):
            node = graph.call_function(op, args)
        propagate_meta(node, op, args)
        return node

    def _factors(self, graph: fx.Graph, site: AttentionSite, index: int) -> list[fx.Node]:
        """``kvc.calibrated_factors`` of layer ``index``, as four getitem nodes."""
        op = torch.ops.kvc.calibrated_factors.default
        args = (site.cached_keys, self.config.to_spec(), index)
        with graph.inserting_before(graph.output_node()):
            node = graph.call_function(op, args)
        propagate_meta(node, op, args)
        return getitems(graph, node, range(4))


LIFT_TARGETS = {torch.ops.kvc.lowrank_lift.default, torch.ops.kvc.lowrank_lift}


class FoldValueProjection(GraphPass):
    """Replace ``o_proj(lift(o))`` by ``o @ folded^T`` wherever the folded weight is known, so the
    rank-R_v attention output goes straight into the output projection (Appendix B of the paper).

    Before (a decode layer reading a low-rank cache; ``folded`` is the cache's fifth factor)::

        lifted = kvc.lowrank_lift(o, value_up, folded)
        out = linear(reshape(lifted, [b, q, -1]), o_proj.weight, bias)

    After::

        out = linear(flatten(o, -2), folded, bias)

    Where ``o_proj`` is not found or ``folded`` is empty the lift stays. The pass ends with dead-code
    elimination, which also drops the markers and nodes the earlier passes left without users.
    """

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        # Whether a graph lifts depends on the cache it reads, not on this configuration; and the
        # dead-code elimination is wanted on every graph.
        return True

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        graph, folded_count = gm.graph, 0
        for lift in [n for n in graph.nodes if n.op == "call_function" and n.target in LIFT_TARGETS]:
            out, _, folded = lift.args
            linear = output_projection(lift)
            if linear is None or fake_value(folded).numel() == 0:
                continue  # o_proj not found, or no folded weight: keep lifting
            bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
            with graph.inserting_before(linear):
                flat = graph.call_function(torch.flatten, (out, -2))
                propagate_meta(flat, torch.flatten, (out, -2))
                folded_linear = graph.call_function(F.linear, (flat, folded, bias))
                propagate_meta(folded_linear, F.linear, (flat, folded, bias))
            linear.replace_all_uses_with(folded_linear)
            folded_count += 1
        graph.eliminate_dead_code(is_impure_node=writes_in_place)
        return folded_count


def writes_in_place(node: fx.Node) -> bool:
    """Kept by dead-code elimination: impure nodes, and in-place tensor methods (``copy_`` of a decode
    step's entries into the cache's storage), whose result nobody reads."""
    return node.is_impure() or (node.op == "call_method" and str(node.target).endswith("_"))


class FuseRopeIntoLowRankProjection(GraphPass):
    """Fuse RoPE into the low-rank projection of each new key (decode graphs).

    Before (the cache projecting a new key; ``k_rope`` is transformers' RoPE)::

        k_rope = k * cos + rotate_half(k) * sin
        entry = kvc.lowrank_project(k_rope, None, key_down)

    After::

        entry = kvc.rope_lowrank_project(k, cos, sin, key_down)

    The GPU kernel rotates and projects in registers and writes only the rank-R entry. On the CPU the
    op computes exactly the model's RoPE and then the projection, so results do not change. Packed
    projections (with head labels) and values (no RoPE) are left as they are.
    """

    @classmethod
    def applies(cls, config: CompressionConfig) -> bool:
        return True  # whether a graph projects new keys depends on the cache it reads, not on this configuration

    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        graph, fused = gm.graph, 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not torch.ops.kvc.lowrank_project.default:
                continue
            k_rope, heads, down = node.args
            cos, sin = rotary_tables(k_rope)
            if heads is not None or cos is None:
                continue
            k_pre = next(term for term in k_rope.args if isinstance(term, fx.Node)).args[0]  # k in k * cos
            args = (k_pre, cos, sin, down)
            with graph.inserting_before(node):
                fused_node = graph.call_function(torch.ops.kvc.rope_lowrank_project.default, args)
            propagate_meta(fused_node, torch.ops.kvc.rope_lowrank_project.default, args)
            node.replace_all_uses_with(fused_node)
            graph.erase_node(node)
            fused += 1
        return fused
