"""Decode speed of an AOTI SnapKV engine built for 2048- and for 6144-token prompts, on a 2048-token prompt.

Runs on whichever kvc_compile is imported, so the same script times an older checkout
(``PYTHONPATH=old_checkout python benchmarks/engine_max_context.py``) against this one.
"""

import tempfile

import torch

from kvc_compile.bench.speed import attention_implementation, measure_engine
from kvc_compile.engine import Engine, build
from kvc_compile.engine.manifest import FORMAT_VERSION
from kvc_compile.models import load_model

model, _ = load_model("smollm2-135m", torch.float32)
ids = torch.randint(100, model.config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
for max_context in (2048, 6144):
    with tempfile.TemporaryDirectory() as folder, attention_implementation(model, "kvc"):
        build(model, {"method": "snapkv", "compression_ratio": 0.5}, folder, target="aoti", max_context=max_context,
              max_new_tokens=33, max_batch=1, force=True, progress=False)
        engine = Engine.load(folder, trusted=True)
        r = measure_engine(f"v{FORMAT_VERSION} built for {max_context}", engine, ids, 32, 3)
        print(f"{r.variant}: decode {r.decode_ms_per_step:.2f} ms/step, prefill {r.prefill_s:.3f} s", flush=True)
