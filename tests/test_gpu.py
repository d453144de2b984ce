"""On an NVIDIA GPU: the compiled path, with the Triton kernels inside, against the eager reference
(which calls the same kernels through the same ops). Skipped without a GPU."""

import pytest
import torch
from conftest import random_prompt, tiny_model

from kvc_compile import CompressedCache, reference_generate
from kvc_compile.plugins.triton import TRITON_AVAILABLE
from kvc_compile.transformers_compat import with_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and TRITON_AVAILABLE), reason="needs an NVIDIA GPU and Triton"),
]


@pytest.mark.parametrize(
    "options",
    [
        {"method": "snapkv", "window_size": 8, "compression_ratio": 0.5},  # window votes + compaction kernels
        {"method": "obcache", "window_size": 8, "compression_ratio": 0.5},  # fused saliency
        {"method": "adakv", "scorer_options": {"window_size": 8}, "compression_ratio": 0.5},  # packed decode kernel
        {"method": "morphkv", "window_size": 4, "budget": 20},  # decode-time eviction with the kernels
        # Periodic eviction of packed layers: window votes over (row, head) pairs, then the packed decode kernel.
        {"method": "adakv", "scorer_options": {"window_size": 4}, "budget": 20, "decoding_interval": 3,
         "target_size": 20},
        # Periodic Compactor: keys un-rotated at their own positions from the step's rotary tables.
        {"method": "compactor", "decoding_window": 6, "chunk_size": 16, "sketch_size": 8, "budget": 20,
         "decoding_interval": 3, "target_size": 20},
    ],
)
def test_inductor_with_kernels_matches_the_reference_on_the_gpu(options):
    model = tiny_model("llama", attn_implementation="kvc").cuda()
    ids = random_prompt(2, 64, seed=4).cuda()
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    expected = reference_generate(model, ids, options, max_new_tokens=8, attention_mask=mask)
    model.compile(backend="kvc", options=options, dynamic=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             **with_cache(CompressedCache()))
    assert torch.equal(out[:, 64:], expected)
