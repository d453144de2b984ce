"""Q-Filters: "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression" (Godey et al.;
arXiv 2503.02812).

Queries and keys of a head are anisotropic: their distributions lean along one direction, so the
attention a key draws from an unknown future query is, on average, about proportional to its
projection on that direction. The filter of a head is the principal direction of its queries (the
first right singular vector of the query matrix over calibration text), signed so that the mean
query projects positively on it; a key's score is its projection on the filter, and the keys
projecting least are evicted. It reads no query at compression time, so it is query-agnostic and
as cheap as KNorm.

Filters are calibrated once per model (``kvc-calibrate --method qfilters``: post-RoPE queries of the
model on calibration text, the query heads of a GQA group pooled, one filter per layer and KV head)
and saved with safetensors together with the model's identity; a file calibrated on another model
is refused. kvpress's ``QFilterPress`` downloads the authors' filters from the Hugging Face hub and
scores ``-(filter · key)`` with them; here nothing is downloaded: the filters come from the model's
own queries, with the sign defined above, and the score is ``filter · key``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from kvc_compile.files import save_safetensors
from kvc_compile.methods.base import Method, ScoreInputs
from kvc_compile.models.identity import CalibrationMismatchError, check_identity

FORMAT = "kvc-compile/query-filters/1"
CALIBRATE = "kvc-calibrate --method qfilters --model MODEL --out FILE"


@dataclass
class QueryFilters:
    """One unit filter per compressed layer and KV head: ``filters`` [n_layers, kv_heads, head_dim]
    fp32, with the identity of the model they were calibrated on and how (``settings``)."""

    filters: Tensor
    identity: dict[str, str | int]
    settings: dict[str, object]

    def save(self, path: str | Path) -> None:
        metadata = {"format": FORMAT, "identity": json.dumps(self.identity, sort_keys=True),
                    "settings": json.dumps(self.settings, sort_keys=True)}
        save_safetensors({"filters": self.filters.float().contiguous()}, path, metadata)

    @classmethod
    def load(cls, path: str | Path) -> QueryFilters:
        """Read a file written by ``save``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Q-Filters file at {path}; produce one with: {CALIBRATE}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CalibrationMismatchError(f"{path} is not a kvc-compile Q-Filters file (format {FORMAT}); "
                                               f"produce one with: {CALIBRATE}")
            filters = handle.get_tensor("filters")
        return cls(filters, json.loads(metadata["identity"]), json.loads(metadata["settings"]))


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> QueryFilters:
    return QueryFilters.load(path)


def load_filters(path: str) -> QueryFilters:
    """The filters at ``path``, read once per version of the file (its modification time is in the key)."""
    try:
        mtime_ns = Path(path).stat().st_mtime_ns
    except OSError:
        mtime_ns = -1  # QueryFilters.load names the missing file and how to make it
    return _load(str(path), mtime_ns)


def fit_filters(gram: Tensor, query_sum: Tensor) -> Tensor:
    """Unit filters from query statistics: ``gram`` [..., d, d] (``Q^T Q`` of the queries a filter
    serves) and ``query_sum`` [..., d]. The first right singular vector of ``Q`` is the top eigenvector
    of ``Q^T Q``; its sign is chosen so that the mean query projects positively on it (+ on a tie)."""
    _, vectors = torch.linalg.eigh(gram.double())
    top = vectors[..., -1]  # eigh sorts eigenvalues in ascending order
    sign = torch.where((query_sum.double() * top).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    return (sign * top).float()


@dataclass(frozen=True)
class QFilters(Method):
    name = "qfilters"
    paper = "arXiv 2503.02812"

    filters: str = ""  # the file kvc-calibrate --method qfilters wrote

    def __post_init__(self) -> None:
        if not isinstance(self.filters, str) or not self.filters:
            raise ValueError(f"qfilters needs filters=FILE, the per-head filters calibrated for the model; produce "
                             f"one with: {CALIBRATE}")
        load_filters(self.filters)  # a missing or foreign file is refused now, not at the first prompt

    @property
    def queries_read(self) -> int | None:
        return 0

    def check_model(self, model) -> None:
        filters = load_filters(self.filters)
        check_identity(filters.identity, model, self.filters, CALIBRATE)

    def score(self, inputs: ScoreInputs) -> Tensor:
        filters = load_filters(self.filters).filters
        batch, kv_heads, n, head_dim = inputs.keys.shape
        if inputs.layer_idx >= filters.shape[0] or filters.shape[1:] != (kv_heads, head_dim):
            raise CalibrationMismatchError(
                f"{self.filters} holds filters of shape {tuple(filters.shape)} (layers, KV heads, head_dim); layer "
                f"{inputs.layer_idx} has {kv_heads} KV heads of {head_dim}: calibrate on this model: {CALIBRATE}")
        layer = filters[inputs.layer_idx].to(inputs.keys.device)
        return torch.einsum("bknd,kd->bkn", inputs.keys.float(), layer)
