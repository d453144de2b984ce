"""What identifies a model's attention, for files calibrated on one model (KQ-SVD projections)."""

from __future__ import annotations

import hashlib

from transformers import PreTrainedModel


def model_identity(model: PreTrainedModel) -> dict[str, str | int]:
    """What a projections file must match: the attention shapes and a fingerprint of the weights."""
    config = model.config
    attention = model.base_model.layers[0].self_attn
    digest = hashlib.sha256()
    last_output = model.base_model.layers[-1].self_attn.o_proj.weight
    for weight in (attention.k_proj.weight, attention.q_proj.weight, last_output):
        digest.update(weight.detach().float().cpu().numpy().tobytes())
    return {
        "name": str(getattr(config, "name_or_path", "") or config.model_type),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": attention.head_dim,
        "weights_sha256": digest.hexdigest()[:16],
    }
