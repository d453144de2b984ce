"""Low-rank (KQ-SVD) entries: the calibrated projections and the maths applied to cached entries.

``LowRankProjections`` holds each layer's factors (``key_down``/``key_up``, ``value_down``/``value_up``,
[kv_heads, d, d] ordered by singular value) and is saved with safetensors together with the model's
identity; a file that does not fit the model it is used with is refused. Fitting the factors
(calibration) lives in ``kvc_compile.eval.lowrank``, their closed forms in ``kvc_compile.methods.kqsvd``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel

from kvc_compile.files import save_safetensors
from kvc_compile.methods.kqsvd import check_rank
from kvc_compile.models.identity import CalibrationMismatchError, check_identity

FORMAT = "kvc-compile/lowrank-projections/1"
FACTOR_NAMES = ("key_down", "key_up", "value_down", "value_up")  # the calibrated ones; then output_fold


def project_entries(x: Tensor, heads: Tensor | None, down: Tensor) -> Tensor:
    """Cached entries ``x`` [batch, A, T, d] times their KV head's ``down`` [kv_heads, d, R].

    Dense layout (``heads`` None): axis ``A`` is the KV head. Packed layout (``A`` = 1): ``heads``
    [batch, 1, T] names each entry's KV head (-1 padding slots are projected with head 0's factor;
    nobody reads them). Returns [batch, A, T, R] in ``x``'s dtype.
    """
    down = down.to(x.dtype)
    if heads is None:
        return torch.einsum("batd,adr->batr", x, down)
    kv_heads, d, rank = down.shape
    every_head = (x @ down.permute(1, 0, 2).reshape(d, kv_heads * rank)).unflatten(-1, (kv_heads, rank))
    index = heads.clamp(min=0).long()[..., None, None].expand(*heads.shape, 1, rank)
    return every_head.gather(-2, index).squeeze(-2)


def fold_heads(output_weight: Tensor, value_up: Tensor) -> Tensor:
    """``o_proj``'s weight [hidden, q_heads * d] with each head's block times its KV head's ``B_v``:
    [hidden, q_heads * R_v], so that ``o_proj(lift(o)) == o @ folded^T`` for rank-R_v outputs ``o``."""
    hidden = output_weight.shape[0]
    kv_heads, head_dim, rank = value_up.shape
    q_heads = output_weight.shape[1] // head_dim
    blocks = output_weight.reshape(hidden, kv_heads, q_heads // kv_heads, head_dim)
    folded = torch.einsum("okgd,kdr->okgr", blocks.float(), value_up.float())
    return folded.reshape(hidden, q_heads * rank).to(output_weight.dtype)


@dataclass
class LowRankProjections:
    """Per layer: key factors ``key_down``/``key_up`` and value factors ``value_down``/``value_up``,
    each [kv_heads, d, d] with columns ordered by singular value (truncate to use a rank), and the
    ranks chosen per layer."""

    method: str
    key_down: list[Tensor]
    key_up: list[Tensor]
    value_down: list[Tensor]
    value_up: list[Tensor]
    key_ranks: list[int]
    value_ranks: list[int]
    identity: dict[str, str | int]
    settings: dict[str, object]

    def save(self, path: str | Path) -> None:
        tensors = {}
        for layer in range(len(self.key_down)):
            for name in ("key_down", "key_up", "value_down", "value_up"):
                tensors[f"layer{layer}.{name}"] = getattr(self, name)[layer].float().contiguous()
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "key_ranks": json.dumps(self.key_ranks),
            "value_ranks": json.dumps(self.value_ranks),
            "identity": json.dumps(self.identity, sort_keys=True),
            "settings": json.dumps(self.settings, sort_keys=True),
        }
        save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | Path, model: PreTrainedModel | None = None) -> LowRankProjections:
        """Read a file written by ``save``; with ``model``, refuse it unless it was calibrated on that model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no projections file at {path}; produce one with: kvc-calibrate --model MODEL --out {path}"
            )
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CalibrationMismatchError(f"{path} is not a kvc-compile projections file (format {FORMAT})")
        tensors = load_file(str(path))
        n_layers = len(json.loads(metadata["key_ranks"]))
        projections = cls(
            method=metadata["method"],
            **{
                name: [tensors[f"layer{layer}.{name}"] for layer in range(n_layers)]
                for name in ("key_down", "key_up", "value_down", "value_up")
            },
            key_ranks=json.loads(metadata["key_ranks"]),
            value_ranks=json.loads(metadata["value_ranks"]),
            identity=json.loads(metadata["identity"]),
            settings=json.loads(metadata["settings"]),
        )
        if model is not None:
            projections.check_model(model, path)
        return projections

    def check_model(self, model: PreTrainedModel, source: str | Path = "these projections") -> None:
        check_identity(self.identity, model, source, "kvc-calibrate --model MODEL --out FILE")

    def truncated(self, key_rank: int | None = None, value_rank: int | None = None) -> LowRankProjections:
        """The same projections with every layer at the given ranks (None: the calibrated ranks)."""
        head_dim = self.key_down[0].shape[-1]
        for rank in (key_rank, value_rank):
            if rank is not None:
                check_rank(rank, head_dim)
        n_layers = len(self.key_down)
        key_ranks = [key_rank] * n_layers if key_rank else list(self.key_ranks)
        value_ranks = [value_rank] * n_layers if value_rank else list(self.value_ranks)
        return LowRankProjections(
            self.method,
            [self.key_down[i][..., : key_ranks[i]] for i in range(n_layers)],
            [self.key_up[i][..., : key_ranks[i]] for i in range(n_layers)],
            [self.value_down[i][..., : value_ranks[i]] for i in range(n_layers)],
            [self.value_up[i][..., : value_ranks[i]] for i in range(n_layers)],
            key_ranks,
            value_ranks,
            dict(self.identity),
            dict(self.settings),
        )
