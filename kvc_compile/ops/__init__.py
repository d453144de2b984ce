"""``torch.library`` custom ops (``kvc::...``) with fake implementations, so Dynamo, AOTAutograd,
Inductor and ``torch.export`` see static output shapes."""

from kvc_compile.ops.compress import compress_kv, compress_site, prefill_entries, valid_keys_from_mask

__all__ = ["compress_kv", "compress_site", "prefill_entries", "valid_keys_from_mask"]
