"""The name transformers gives the cache argument and output, on every version we run on.

transformers 5.25 renamed ``past_key_values`` (and ``cache_params``) to ``cache``, warns on every
call that uses the old name and announces its removal (5.40 for ``generate``, 6.0 for ``forward``);
5.17 (on the GPU machines) knows only ``past_key_values``. Code here passes and reads the cache
through these two helpers.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

#: The keyword a model's ``forward`` and ``generate`` take the cache by, and the output's field.
CACHE_ARG: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """``{CACHE_ARG: cache}``: spread into a forward or generate call, ``model(ids, **with_cache(c))``."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a forward or generate output carries."""
    return getattr(output, CACHE_ARG)
