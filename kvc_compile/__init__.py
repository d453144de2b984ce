"""kvc-compile: KV-cache compression as a torch.compile graph pass.

    model.compile(backend="kvc", options={"method": "snapkv", "compression_ratio": 0.5})
    model.generate(input_ids, max_new_tokens=32)   # the cache inside is the compressed one
"""

from kvc_compile.backend import kvc_backend
from kvc_compile.cache import CompressedCache, cache_nbytes, kept_tokens_per_layer
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.config import CompressionConfig
from kvc_compile.engine import Engine, EngineError, build
from kvc_compile.lookahead import lookahead_generate
from kvc_compile.methods import list_methods  # every name method= accepts, kqsvd too
from kvc_compile.models import ModelNotFoundError, load_model
from kvc_compile.ops.kernels import packed_attention
from kvc_compile.reference import reference_generate, reference_prefill
from kvc_compile.version import __version__

__all__ = [
    "__version__",
    "ATTENTION_IMPLEMENTATION",
    "CompressedCache",
    "CompressionConfig",
    "Engine",
    "EngineError",
    "ModelNotFoundError",
    "build",
    "cache_nbytes",
    "kept_tokens_per_layer",
    "kvc_backend",
    "list_methods",
    "load_model",
    "lookahead_generate",
    "packed_attention",
    "reference_generate",
    "reference_prefill",
]
