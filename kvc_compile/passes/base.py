"""What every kvc pass is, and the record the passes hand their results on in.

A pass is a ``GraphPass``: ``applies(config)`` says whether it runs for a configuration, and calling
it rewrites the graph in place and returns how many rewrites it made. Its class docstring shows a
small graph before and after the rewrite. The ``PassManager`` decides which passes run and in what
order; a pass does not check again whether it applies.

The passes run on the traced graph before it reaches the inner compiler (Inductor, or eager), never
as Inductor post-grad passes, so they contribute nothing to Inductor's cache key: the configuration
they depend on travels inside the graph, as the spec argument of the ops they insert. A pass moved
into Inductor's post-grad hooks would have to give a stable key (``CustomGraphPass.uuid``) that
covers the configuration, or Inductor would reuse a graph compiled without it.

The attention sites are what the analysis found (``find_attention_sites``) and stay as found. What
one pass leaves for a later one (what the cache now stores for a site, the site's buffer of recent
queries) goes in the ``RewriteRecord`` the manager hands to every pass in turn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import fx

from kvc_compile.config import CompressionConfig
from kvc_compile.passes.attention_sites import AttentionSite


@dataclass
class SiteRewrite:
    """What the passes have made of one attention site so far."""

    # The tensors the cache stores for the site: the cached tensors themselves until an eviction pass
    # rewires them; ``stored_heads`` labels packed entries (None: dense layout).
    stored_keys: fx.Node
    stored_values: fx.Node
    stored_heads: fx.Node | None = None
    # The layer's buffer of recent queries after this step, where one is kept (decode-time scoring).
    recent_queries: fx.Node | None = None


@dataclass
class RewriteRecord:
    """The attention sites of one graph and, per site (by ``layer_idx``), what the passes made of it."""

    sites: list[AttentionSite]
    rewrites: dict[int, SiteRewrite] = field(init=False)

    def __post_init__(self) -> None:
        self.rewrites = {site.layer_idx: SiteRewrite(site.cached_keys, site.cached_values) for site in self.sites}

    def of(self, site: AttentionSite) -> SiteRewrite:
        return self.rewrites[site.layer_idx]

    @property
    def prefill_sites(self) -> list[AttentionSite]:
        return [site for site in self.sites if site.is_prefill]

    @property
    def decode_sites(self) -> list[AttentionSite]:
        return [site for site in self.sites if not site.is_prefill]


class GraphPass(ABC):
    """One rewrite of a traced graph.

    Convention: the class docstring shows a small graph before and after the rewrite.
    """

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    @classmethod
    @abstractmethod
    def applies(cls, config: CompressionConfig) -> bool:
        """Whether this pass runs for ``config``."""

    @abstractmethod
    def __call__(self, gm: fx.GraphModule, record: RewriteRecord) -> int:
        """Rewrite ``gm`` in place, reading and updating ``record``; returns the number of rewrites."""
