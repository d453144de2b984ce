"""What a prompt batch must be before a model sees it.

An empty prompt or batch fails deep inside the model (transformers reshapes the projections with a
``-1`` axis, which is ambiguous for zero elements); the entry points that take prompts refuse it
first with the reason.
"""

from __future__ import annotations

from torch import Tensor


def check_prompt_ids(input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
    """Refuse a batch that holds no prompt, a prompt with no token, or a row that is all padding."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}; add a batch "
                         f"axis with input_ids[None]")
    batch, length = input_ids.shape
    if batch == 0:
        raise ValueError("the batch holds no prompt (input_ids has shape [0, ...]); give at least one prompt")
    if length == 0:
        raise ValueError("the prompt is empty (0 tokens); there is nothing to prefill: give at least one token")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{(batch, length)}; they must match")
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt rows {empty} are all padding (their attention_mask is 0 everywhere); "
                             f"give each row at least one token")
