"""What a compression method is, and the selection every scorer shares.

A method only says how much each cached token is worth (``score``). The framework turns the
scores into kept tokens (``select_uniform`` / ``select_head_adaptive``), so every method gets
the same budget arithmetic, padding rules and static output shapes.

Two cache layouts come out of compression:

* ``dense``: every KV head keeps the same number of tokens: keys ``[batch, kv_heads, k, d]``.
* ``packed``: heads (or layers) keep different counts. A layer stores its entries flattened,
  keys ``[batch, 1, T, d]`` with ``T = kv_heads * k`` per row, and ``heads [batch, 1, T]`` says which
  KV head each entry belongs to (-1 for a padding slot nobody may attend to). Nothing is padded
  per head, so the memory of evicted entries is really freed; ``kvc_compile.attention`` reads
  this layout at decode time.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

# Scores of tokens that must be kept (observation window, sinks) and that must never be kept
# (padding). Infinite values keep them apart from every finite score a method can produce.
PROTECTED = float("inf")
EXCLUDED = float("-inf")
LAYOUTS = ("dense", "packed")
# Entry positions and heads: int32 keeps their overhead at 8 bytes per cached entry.
INDEX_DTYPE = torch.int32


class RotaryNotFoundError(ValueError):
    pass


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
    # ``window_votes(queries, keys, valid, window)``: a kernel standing in for the reference on the
    # GPU (``kvc_compile.ops.kernels``); None for the pure-PyTorch reference.
    votes_kernel: Callable[[Tensor, Tensor, Tensor, int], Tensor] | None = None
    # ``select_and_gather(scores, keys, values, k)``: the GPU kernel for uniform selection + gather.
    select_kernel: Callable | None = None
    # ``output_saliency(queries, keys, values, valid, window, variant)``: OBCache's fused GPU scoring.
    saliency_kernel: Callable | None = None
    # [batch, n] bool: the rows of ``queries`` that hold real queries, when not those of ``valid``.
    # Decode-time compression sets it: only the newest rows hold the buffer of recent queries.
    query_valid: Tensor | None = None
    # [batch, kv_heads, n] int: the logical position of each entry, while decoding (after evictions an
    # entry no longer sits at its position's index).
    positions: Tensor | None = None
    # (cos, sin) [batch, kv_heads, n, head_dim] at each entry's own position, while decoding, for
    # methods that un-rotate keys (``Method.unrotates_keys``); None: ``cos``/``sin`` serve keys too.
    key_tables: tuple[Tensor, Tensor] | None = None

    def window_votes(self, window: int) -> Tensor:
        """Attention of the last ``window`` queries over every key, summed over them: [batch, q_heads, n] fp32."""
        from kvc_compile.methods.snapkv import window_votes

        return (self.votes_kernel or window_votes)(self.queries, self.keys, self.valid, window)

    def output_saliency(self, window: int, variant: str) -> Tensor:
        """OBCache's saliency of every key for the last ``window`` queries' outputs: [batch, q_heads, n] fp32."""
        from kvc_compile.methods.obcache import window_output_saliency

        kernel = self.saliency_kernel or window_output_saliency
        return kernel(self.queries, self.keys, self.values, self.valid, window, variant)

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


def unrotate_with(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` rotated back by the tables ``cos``/``sin`` (broadcastable to ``x``), in fp32.

    Tables of YaRN-like RoPE carry an attention scaling ``m`` (``m cos``, ``m sin``): rotating back
    with them scales by ``m`` once more, so divide by ``m^2 = cos^2 + sin^2``.
    """
    x = x.float()
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


@dataclass(frozen=True)
class Method(ABC):
    """A scorer: one dataclass per method, its fields are its options."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    # "packed" when heads or layers keep different numbers of tokens (see the module docstring).
    layout: ClassVar[str] = "dense"
    # Methods that read pre-RoPE queries/keys: the pass must find the rotary tables.
    needs_rotary: ClassVar[bool] = False
    # Methods that un-rotate keys: while decoding they get the tables of every entry's own position.
    unrotates_keys: ClassVar[bool] = False
    # Methods that compress at every decoding step too (MorphKV), back to the prefill budget.
    compresses_while_decoding: ClassVar[bool] = False

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
        """Queries per layer a lookahead method (LAQ) keeps for its second stage (0: not one)."""
        return 0

    @property
    def budgets_across_layers(self) -> bool:
        """True when a layer's budget depends on the scores of every layer (see ``layer_budgets``)."""
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

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def check_decoding_window(method: str, window: int, minimum: int = 1) -> None:
    """Refuse a ``decoding_window`` (recent queries a method scores from while decoding) below ``minimum``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < minimum:
        raise ValueError(f"{method}: decoding_window must be an integer >= {minimum} (the recent queries it scores "
                         f"from while decoding), got {window!r}")


def rotary_tables_back(cos: Tensor, sin: Tensor, inv_freq: Tensor, steps_back: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary tables (fp32) of the positions ``steps_back`` [batch, heads, count] before a token's.

    ``cos``/``sin`` [batch, 1, q, d] are the tables the newest ``q`` tokens were rotated with (their
    last column is the anchor, at position ``p``) and ``inv_freq`` [d/2] the rotary frequencies
    ``theta_i``. As complex numbers ``c_p = m exp(i p theta_i)``, step ``k`` back is
    ``c_p exp(-i k theta_i)``. Anchoring on the tables the model computed keeps each row's own
    positions (left padding shifts them per row) and the attention scaling ``m``. Returns
    [batch, heads, count, d] each.
    """
    half = cos.shape[-1] // 2
    if inv_freq.numel() != half:
        raise ValueError(f"rotary tables of {cos.shape[-1]} dims need {half} inverse frequencies, got "
                         f"{inv_freq.numel()}: only full-width rotate_half RoPE (Llama, Mistral, Qwen) is supported")
    anchor = torch.complex(cos[:, :, -1:, :half].double(), sin[:, :, -1:, :half].double())
    phases = -steps_back[..., None].to(torch.float64) * inv_freq.to(cos.device, torch.float64)
    table = anchor * torch.polar(torch.ones_like(phases), phases)  # [batch, heads, count, d/2]
    table = torch.cat([table, table], dim=-1)
    return table.real.float(), table.imag.float()


def rotary_tables_before(cos: Tensor, sin: Tensor, inv_freq: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Rotary tables [batch, 1, count, d] (fp32) of the ``count`` positions ending at the newest
    token's (see ``rotary_tables_back``): row ``j`` holds position ``p - (count - 1 - j)``."""
    steps_back = torch.arange(count - 1, -1, -1, device=cos.device).expand(cos.shape[0], 1, count)
    return rotary_tables_back(cos, sin, inv_freq, steps_back)


def gqa_mean(per_query_head: Tensor, kv_heads: int) -> Tensor:
    """Average [batch, q_heads, n] scores over each GQA group -> [batch, kv_heads, n]."""
    batch, q_heads, n = per_query_head.shape
    return per_query_head.view(batch, kv_heads, q_heads // kv_heads, n).mean(dim=2)


def gqa_max(per_query_head: Tensor, kv_heads: int) -> Tensor:
    """Max of [batch, q_heads, n] scores over each GQA group -> [batch, kv_heads, n]."""
    batch, q_heads, n = per_query_head.shape
    return per_query_head.view(batch, kv_heads, q_heads // kv_heads, n).amax(dim=2)


# A faster implementation of ``top_positions`` for some tensors (the ops layer registers the Triton
# radix select for CUDA tensors): (scores, k) -> positions, or None to use the reference.
_top_positions_kernel: Callable[[Tensor, int], Tensor | None] | None = None


def register_top_positions_kernel(kernel: Callable[[Tensor, int], Tensor | None]) -> None:
    global _top_positions_kernel
    _top_positions_kernel = kernel


def top_positions(scores: Tensor, k) -> Tensor:
    """Positions of the ``k`` best scores along the last axis, ascending; ties go to the lowest
    positions (max pooling makes plateaus of equal scores), so every device keeps the same entries
    (the Triton radix select registered for GPU tensors follows the same rule)."""
    if _top_positions_kernel is not None and (found := _top_positions_kernel(scores, k)) is not None:
        return found
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def select_uniform(scores: Tensor, valid: Tensor, n_kept) -> Tensor:
    """Indices of the ``n_kept`` best tokens per KV head, in ascending position order.

    Padding never outranks a real token. Ascending order matters: with left padding, any padding
    slot a short row is forced to keep lands first, which is where the logical attention mask
    (offset by the number of evicted tokens) masks it out.
    """
    scores = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
    return top_positions(scores, n_kept)


def select_head_adaptive(scores: Tensor, valid: Tensor, n_kept, alpha_safeguard: float) -> Tensor:
    """AdaKV selection: ``kv_heads * n_kept`` entries per row, shared out between heads by score.

    Each head first keeps its own top ``int(n_kept * alpha_safeguard)`` tokens (the safeguard
    floor), then the best remaining (head, token) pairs of the whole layer fill the budget, so
    heads whose attention is concentrated give slots to heads whose attention is spread.
    Returns [batch, kv_heads * n_kept] flat indices ``head * n + position``, ascending.
    """
    batch, kv_heads, n = scores.shape
    scores = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
    floor = int(n_kept * alpha_safeguard)
    if floor > 0:
        own_best = scores.topk(floor, dim=-1).indices
        # Above every finite score but below PROTECTED ties, so the floor never displaces a window.
        boosted = scores.scatter(-1, own_best, torch.finfo(torch.float32).max)
        scores = torch.where(torch.isinf(scores), scores, boosted)
    return top_positions(scores.reshape(batch, kv_heads * n), kv_heads * n_kept)


def gather_kept(tensor: Tensor, kept: Tensor) -> Tensor:
    """Gather [batch, kv_heads, n, d] along the token axis with [batch, kv_heads, k] indices."""
    return tensor.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def positions_from_first_valid(valid: Tensor) -> Tensor:
    """Position of each token counted from the row's first real token ([batch, n], padding < 0)."""
    return valid.long().cumsum(dim=-1) - 1


def kv_heads_view(x: Tensor, kv_heads: int) -> Tensor:
    """Broadcast a [batch, n] tensor to [batch, kv_heads, n]."""
    return x[:, None, :].expand(-1, kv_heads, -1)


class CompressedKV(NamedTuple):
    """One layer after compression. ``positions``: prompt position of each kept entry; ``heads``:
    its KV head (-1: a padding slot in the packed layout). Dense: [b, h, k(, d)]; packed: [b, 1, T(, d)]."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    heads: Tensor


def dense_heads(kept: Tensor) -> Tensor:
    """The KV head of each entry of a dense selection [batch, kv_heads, k]."""
    kv_heads = kept.shape[1]
    return torch.arange(kv_heads, device=kept.device, dtype=INDEX_DTYPE)[:, None].expand_as(kept).clone()


def keep_dense(keys: Tensor, values: Tensor, kept: Tensor) -> CompressedKV:
    """The dense layout of the entries ``kept`` [batch, kv_heads, k] (positions, ascending)."""
    return CompressedKV(gather_kept(keys, kept), gather_kept(values, kept), kept.to(INDEX_DTYPE), dense_heads(kept))


def prefill_entries(batch: int, kv_heads: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions and heads of an uncompressed dense cache: [batch, kv_heads, n] each."""
    positions = torch.arange(n, device=device, dtype=INDEX_DTYPE).expand(batch, kv_heads, n).clone()
    heads = torch.arange(kv_heads, device=device, dtype=INDEX_DTYPE)[:, None].expand(batch, kv_heads, n).clone()
    return positions, heads


def compress_layer(method: Method, n_kept, inputs: ScoreInputs, scores: Tensor | None = None) -> CompressedKV:
    """Score, select and gather one layer. ``n_kept``: tokens per KV head on average over the model.
    ``scores``: the layer's ``method.score(inputs)`` when already computed (scores never depend on
    ``n_kept``, so one scoring serves every compression ratio).

    The outputs are fresh tensors (never views of the inputs), as a custom op's outputs must be.
    """
    keys, values, valid = inputs.keys, inputs.values, inputs.valid
    batch, kv_heads, n, head_dim = keys.shape
    n_kept = method.layer_kept_length(n_kept, n, inputs.layer_idx, inputs.n_layers)
    if method.layout == "dense":
        if n_kept >= n:
            positions, heads = prefill_entries(batch, kv_heads, n, keys.device)
            # Contiguous copies: the fake kernel promises the layout of a fresh tensor, and a plain
            # clone would keep the strides of a transposed input (Inductor asserts them).
            fresh = torch.contiguous_format
            return CompressedKV(keys.clone(memory_format=fresh), values.clone(memory_format=fresh), positions, heads)
        scores = method.score(inputs) if scores is None else scores
        if inputs.select_kernel is None or type(method).select is not Method.select:
            return keep_dense(keys, values, method.select(scores, valid, n_kept))
        # Uniform selection on the GPU: a radix select and a compaction kernel that gathers as it goes.
        masked = scores.float().masked_fill(~valid[:, None, :], EXCLUDED)
        kept_keys, kept_values, kept = inputs.select_kernel(masked, keys, values, n_kept)
        return CompressedKV(kept_keys, kept_values, kept.to(INDEX_DTYPE), dense_heads(kept))
    if n_kept >= n:
        flat = torch.arange(kv_heads * n, device=keys.device).expand(batch, kv_heads * n)
    else:
        flat = method.select(method.score(inputs) if scores is None else scores, valid, n_kept)
    return pack_entries(keys, values, flat, valid)


def pack_entries(keys: Tensor, values: Tensor, flat: Tensor, valid: Tensor) -> CompressedKV:
    """The packed layout of the entries ``flat`` [batch, T] (``head * n + position``; -1 pads a row).

    Entries at padding positions, and the -1 slots of rows that keep fewer than ``T``, get head -1:
    no head attends to them.
    """
    batch, kv_heads, n, _ = keys.shape
    slot = flat.clamp(min=0)
    heads, positions = slot // n, slot % n
    heads = heads.masked_fill(~valid.gather(1, positions) | (flat < 0), -1)

    def pack(x: Tensor) -> Tensor:
        rows = x.reshape(batch, kv_heads * n, x.shape[-1])
        return rows.gather(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1])).unsqueeze(1)

    positions, heads = positions.to(INDEX_DTYPE).unsqueeze(1), heads.to(INDEX_DTYPE).unsqueeze(1)
    return CompressedKV(pack(keys), pack(values), positions, heads)


def compress_layers_jointly(
    method: Method, n_kept: int, layer_scores: list[Tensor], keys: list[Tensor], values: list[Tensor], valid: Tensor
) -> list[CompressedKV]:
    """Select and gather every layer at once, for methods whose layer budgets depend on all layers.

    ``method.layer_budgets`` gives each row and layer its tokens per KV head; each layer is then
    selected row by row and packed, a row that keeps fewer entries than the layer's longest row
    being padded with head -1 slots.
    """
    if method.layout != "packed":
        raise ValueError(f"{method.name}: budgets across layers need the packed layout")
    batch, kv_heads, n, _ = keys[0].shape
    if n_kept >= n:
        flat = torch.arange(kv_heads * n, device=valid.device).expand(batch, kv_heads * n)
        return [pack_entries(k, v, flat, valid) for k, v in zip(keys, values, strict=True)]
    budgets = method.layer_budgets(layer_scores, valid, n_kept).tolist()
    compressed = []
    for layer, (scores, layer_keys, layer_values) in enumerate(zip(layer_scores, keys, values, strict=True)):
        rows = [
            method.select(scores[row : row + 1], valid[row : row + 1], budgets[row][layer])[0] for row in range(batch)
        ]
        flat = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        compressed.append(pack_entries(layer_keys, layer_values, flat, valid))
    return compressed


def compressed_shapes(method: Method, n_kept, batch: int, kv_heads: int, n, layer_idx: int, n_layers: int):
    """(entry axis shape [batch, heads_axis, length]) of ``compress_layer``'s outputs, SymInt-safe."""
    n_kept = method.layer_kept_length(n_kept, n, layer_idx, n_layers)
    if method.layout == "dense":
        return (batch, kv_heads, n_kept)
    return (batch, 1, kv_heads * n_kept)
