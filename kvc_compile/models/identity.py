"""What identifies a model's attention, for files calibrated on one model (KQ-SVD projections,
Q-Filters), and the refusal of a file calibrated on another."""

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


class CalibrationMismatchError(ValueError):
    """A calibration file used with a model (or settings) it was not calibrated for."""


def check_identity(saved: dict, model: PreTrainedModel, source: object, calibrate: str) -> None:
    """Refuse ``model`` unless it matches the identity a calibration file ``source`` recorded;
    ``calibrate`` is the command that makes a file for it."""
    expected = model_identity(model)
    # The name records where the weights came from; the same weights load from several places.
    different = {key: (saved.get(key), value) for key, value in expected.items()
                 if key != "name" and saved.get(key) != value}
    if different:
        details = ", ".join(f"{key}: file {file!r} vs model {now!r}" for key, (file, now) in different.items())
        raise CalibrationMismatchError(
            f"{source} was calibrated for another model ({details}; calibrated on {saved.get('name')!r}); "
            f"calibrate on this one: {calibrate}"
        )
