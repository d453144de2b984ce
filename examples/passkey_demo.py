"""Compress SmolLM2-135M's KV cache with SnapKV inside torch.compile and answer a pass-key prompt.

Run: python examples/passkey_demo.py   (or `make demo`)
"""

import torch

import kvc_compile
from kvc_compile.eval.passkey import passkey_inputs
from kvc_compile.transformers_compat import output_cache

model, tokenizer = kvc_compile.load_model("smollm2-135m")
sample, input_ids = passkey_inputs(tokenizer, target_tokens=1500, seed=0)

# In place: generate() calls the compiled forward, so the cache it carries is the compressed one.
model.compile(
    backend="kvc",
    options={"method": "snapkv", "compression_ratio": 0.5, "window_size": 32, "kernel_size": 7, "pooling": "max"},
    dynamic=True,
)
with torch.no_grad():
    out = model.generate(input_ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)

answer = tokenizer.decode(out.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)
print(f"pass key {sample.answer}; model says {answer.strip()!r}")
print(f"prompt {input_ids.shape[1]} tokens; cache holds {kvc_compile.kept_tokens_per_layer(output_cache(out))[0]} "
      f"per layer and KV head after generation, {kvc_compile.cache_nbytes(output_cache(out)):,} bytes")
