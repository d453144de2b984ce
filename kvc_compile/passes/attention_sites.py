"""Find the attention sites of a traced decoder and the cache tensors each one reads.

Works on Dynamo graphs (torch-level calls) and on the ``torch.export`` graphs (aten level) that an
engine build (``kvc_compile.engine``) runs the same passes on, so the op tables below list both
spellings. An attention site is either a scaled-dot-product-attention call or transformers' eager
pattern ``matmul(q, k^T) [* scale] [+ mask] -> softmax -> [dropout] -> matmul(., v)``. From the site's
key and value operands we walk back through the GQA expansion (``repeat_kv``: index, expand,
reshape) to the tensors that the graph also returns: those are what the KV cache stores.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

SDPA_TARGETS = {
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
}
MATMUL_TARGETS = {torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default}
SOFTMAX_TARGETS = {torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default}
SOFTMAX_METHODS = {"softmax"}
ADD_TARGETS = {operator.add, torch.add, aten.add.Tensor}
CAT_TARGETS = {torch.cat, aten.cat.default}

# Ops that only re-lay out a tensor (repeat_kv, transposes, dtype casts): walked through when
# looking for the cached tensor behind an attention operand.
LAYOUT_METHODS = {
    "expand", "reshape", "view", "transpose", "contiguous", "repeat_interleave", "to", "unsqueeze", "clone", "float",
    "type_as",
}
LAYOUT_FUNCTIONS = {
    operator.getitem, torch.repeat_interleave, torch.transpose, torch.reshape, torch.unsqueeze,
    aten.expand.default, aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.transpose.int,
    aten.clone.default, aten._unsafe_view.default, aten.slice.Tensor, aten.repeat_interleave.self_int,
    aten._to_copy.default, aten.alias.default, aten.contiguous.default, aten.permute.default,
}
# A slice of a cache layer's storage, and the copy that writes a step's entries into it.
SLICE_FUNCTIONS = {operator.getitem, aten.slice.Tensor}
SLICE_METHODS = {"narrow", "__getitem__"}
COPY_FUNCTIONS = {aten.copy_.default, torch.Tensor.copy_}
COPY_METHODS = {"copy_"}
# Ops between the score matmul and the softmax (scale, mask, dtype casts) or between the softmax
# and the value matmul (dropout, casts).
SCORE_CHAIN_METHODS = {"to", "float", "type_as", "contiguous"}
SCORE_CHAIN_FUNCTIONS = {
    operator.mul, operator.truediv, torch.mul, aten.mul.Tensor, aten.div.Tensor, F.dropout, aten.dropout.default,
    aten._to_copy.default, aten.clone.default,
} | ADD_TARGETS


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer in a graph, as the analysis found it (passes record what they make of it in a
    ``RewriteRecord``, not here)."""

    layer_idx: int
    attention: fx.Node  # the node after which the cache may be rewritten
    query: fx.Node
    cached_keys: fx.Node  # tensors the graph returns and the cache stores
    cached_values: fx.Node
    mask: fx.Node | None
    # Packed decode sites (``kvc::packed_attention``): the entries' head labels the graph returns, and
    # the model's number of KV heads (None: a dense site).
    cached_heads: fx.Node | None = None
    kv_heads: int | None = None

    @property
    def query_length(self):
        return fake_value(self.query).shape[-2]

    @property
    def cached_length(self):
        return fake_value(self.cached_keys).shape[-2]

    @property
    def packed(self) -> bool:
        return self.cached_heads is not None

    @property
    def entries_per_head(self):
        """Cached entries per KV head (packed: on average over the heads)."""
        return self.cached_length // self.kv_heads if self.packed else self.cached_length

    @property
    def new_keys(self) -> fx.Node | None:
        """The step's new keys as the cache received them (``k_rope`` in ``cat([past, k_rope], -2)``);
        a packed layer appends them re-laid out token-major, so walk back through that."""
        if self.cached_keys.op == "call_function" and self.cached_keys.target in CAT_TARGETS:
            parts = self.cached_keys.args[0]
            node = parts[-1] if isinstance(parts, (list, tuple)) and parts else None
        else:  # a layer that appends in place: the entries written into its storage
            node = in_place_write(self.cached_keys)
        while self.packed and isinstance(node, fx.Node) and is_layout_op(node):
            node = node.args[0]
        return node

    @property
    def is_prefill(self) -> bool:
        """Query length above 1 and nothing cached before this call (cache length == query length)."""
        q_len, kv_len = self.query_length, self.cached_length
        if isinstance(q_len, int) and q_len == 1:
            return False
        return statically_known_true(q_len == kv_len)


def fake_value(node: fx.Node):
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None:
        raise ValueError(f"node {node.name} carries no shape metadata; run the pass on a traced graph")
    return value


def graph_outputs(graph: fx.Graph) -> set[fx.Node]:
    outputs: set[fx.Node] = set()
    fx.node.map_arg(graph.output_node().args, outputs.add)
    return outputs


def _is_call(node: fx.Node, functions: set, methods: set = frozenset()) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def is_layout_op(node: fx.Node) -> bool:
    """Whether ``node`` only re-lays out its first argument (reshape, transpose, contiguous, casts)."""
    return _is_call(node, LAYOUT_FUNCTIONS, LAYOUT_METHODS)


LINEAR_TARGETS = {F.linear, torch._C._nn.linear, aten.linear.default}


def output_projection(node: fx.Node) -> fx.Node | None:
    """The ``linear`` (``o_proj``) that ``node``'s attention output reaches through layout-only ops."""
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            return node
        if not is_layout_op(node):
            return None
    return None


def linear_weight(linear: fx.Node) -> fx.Node:
    """The weight operand of a ``linear`` node."""
    return linear.args[1] if len(linear.args) > 1 else linear.kwargs["weight"]


def in_place_write(node: fx.Node) -> fx.Node | None:
    """What the graph last writes into a slice of ``node`` (``node[:, :, a:b].copy_(new)``: a decode
    step appending its entries to a cache layer's storage), or None."""
    written = None
    for user in node.users:  # users are in graph order
        if not _is_call(user, SLICE_FUNCTIONS, SLICE_METHODS) or user.args[0] is not node:
            continue
        for write in user.users:
            if _is_call(write, COPY_FUNCTIONS, COPY_METHODS) and write.args[0] is user:
                written = write.args[1]
    return written


def updates_input_in_place(node: fx.Node) -> bool:
    """Whether ``node`` is an in-place aten op on a graph input (``index_copy_(state, 2, slot, k)``):
    an engine's fixed-capacity decode writing the step's entries into the cache buffers it was given."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.name.endswith("_") and bool(node.args)
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder")


def _cached_source(node: fx.Node, outputs: set[fx.Node]) -> fx.Node | None:
    """Walk back through layout-only ops to a tensor the graph returns, writes a step's entries into,
    or a cache buffer it was given and updates in place."""
    while isinstance(node, fx.Node):
        if node in outputs or in_place_write(node) is not None or updates_input_in_place(node):
            return node
        if not _is_call(node, LAYOUT_FUNCTIONS, LAYOUT_METHODS) or not node.args:
            return None
        node = node.args[0]
    return None


def _sdpa_site(node: fx.Node, outputs: set[fx.Node]) -> tuple | None:
    query, keys, values = node.args[:3]
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    cached_keys, cached_values = _cached_source(keys, outputs), _cached_source(values, outputs)
    if cached_keys is None or cached_values is None:
        return None
    return node, query, cached_keys, cached_values, mask


def _eager_site(node: fx.Node, outputs: set[fx.Node]) -> tuple | None:
    """``node`` is a matmul; accept it if it is q @ K^T of the eager attention pattern."""
    cached_keys = _cached_source(node.args[1], outputs)
    if cached_keys is None:
        return None
    mask, current = None, node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if _is_call(user, SOFTMAX_TARGETS, SOFTMAX_METHODS):
            current = user
            break
        if not _is_call(user, SCORE_CHAIN_FUNCTIONS, SCORE_CHAIN_METHODS):
            return None
        if _is_call(user, ADD_TARGETS):
            mask = next((a for a in user.args if isinstance(a, fx.Node) and a is not current), None)
        current = user
    else:
        return None
    while len(current.users) == 1:
        user = next(iter(current.users))
        if _is_call(user, MATMUL_TARGETS) and user.args[0] is current:
            cached_values = _cached_source(user.args[1], outputs)
            if cached_values is None:
                return None
            return user, node.args[0], cached_keys, cached_values, mask
        if not _is_call(user, SCORE_CHAIN_FUNCTIONS, SCORE_CHAIN_METHODS):
            return None
        current = user
    return None


def is_packed_attention(node: fx.Node) -> bool:
    """A call of ``kvc::packed_attention`` (by name: the op registers after this module loads)."""
    return node.op == "call_function" and str(node.target) in ("kvc.packed_attention", "kvc.packed_attention.default")


def _packed_site(node: fx.Node, outputs: set[fx.Node], layer_idx: int) -> AttentionSite | None:
    """``kvc::packed_attention(q, keys, values, heads, kv_heads, scaling)``: a decode step over a packed layer."""
    query, keys, values, heads, kv_heads = node.args[:5]
    cached = [_cached_source(tensor, outputs) for tensor in (keys, values, heads)]
    if any(source is None for source in cached):
        return None
    return AttentionSite(layer_idx, node, query, cached[0], cached[1], None, cached_heads=cached[2], kv_heads=kv_heads)


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site of ``graph`` that reads cached keys and values, in layer order."""
    outputs = graph_outputs(graph)
    sites: list[AttentionSite] = []
    for node in graph.nodes:
        found = None
        if _is_call(node, SDPA_TARGETS):
            found = _sdpa_site(node, outputs)
        elif _is_call(node, MATMUL_TARGETS):
            found = _eager_site(node, outputs)
        elif is_packed_attention(node):
            found = _packed_site(node, outputs, len(sites))
        if isinstance(found, tuple):
            found = AttentionSite(len(sites), *found)
        if found is not None:
            sites.append(found)
    return sites


def dynamo_compile_frame():
    """The frame of Dynamo's ``_compile`` converting the user's frame, if this call is inside one."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_compile" and "convert_frame" in frame.f_code.co_filename:
            return frame
        frame = frame.f_back
    return None


def traced_module(gm: fx.GraphModule | None = None) -> torch.nn.Module | None:
    """The module whose frame Dynamo is converting (best effort; None outside Dynamo or when not found).

    Dynamo graphs do not record their root module, so look on the Python stack for the frame Dynamo
    converts: its ``self``, or the first argument of a wrapper (``model.compile`` and transformers'
    argument-renaming decorators trace ``wrapped(*args)`` with the module first).
    """
    frame = dynamo_compile_frame()
    frame_locals = frame.f_locals.get("locals") if frame is not None else None
    if not isinstance(frame_locals, dict):
        return None
    candidates = [frame_locals.get("self")]
    args = frame_locals.get("args")
    if isinstance(args, tuple) and args:
        candidates.append(args[0])
    return next((c for c in candidates if isinstance(c, torch.nn.Module)), None)


def traced_config(gm: fx.GraphModule | None = None):
    """The transformers config of the model being traced (best effort): the traced module's, or one the
    converted frame holds (a graph can start inside a helper such as mask creation)."""
    module = traced_module(gm)
    config = getattr(module, "config", None)
    if config is not None:
        return config
    frame = dynamo_compile_frame()
    frame_locals = frame.f_locals.get("locals") if frame is not None else None
    if not isinstance(frame_locals, dict):
        return None
    return next((value for value in frame_locals.values() if hasattr(value, "_attn_implementation")), None)


def compiled_code():
    """The code object Dynamo is compiling (None outside Dynamo)."""
    frame = dynamo_compile_frame()
    return None if frame is None else frame.f_locals.get("code")


def root_module_name(gm: fx.GraphModule) -> str:
    """The class of the traced model, for error messages (best effort): the module Dynamo is
    converting, else the outermost module in the graph's module stack."""
    module = traced_module(gm)
    if module is not None:
        return type(module).__name__
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            _, module_type = next(iter(stack.values()))
            return getattr(module_type, "__name__", str(module_type))
    return "the compiled function"


def reads_packed_cache(graph: fx.Graph) -> bool:
    """Whether ``graph`` is a decode step over packed (per-head budget) caches."""
    return any(is_packed_attention(node) for node in graph.nodes)
