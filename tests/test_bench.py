"""kvc-bench's measurement loop on a tiny model: every variant timed, the cache bytes measured."""

from conftest import random_prompt, tiny_model

from kvc_compile.bench.speed import bench_variants, markdown


def test_variants_side_by_side_and_the_cache_halves():
    model = tiny_model("llama")
    ids = random_prompt(1, 64)
    options = {"method": "snapkv", "compression_ratio": 0.5, "window_size": 8, "inner_backend": "eager"}
    results = bench_variants(model, ids, options, new_tokens=4, repeats=1, engine_target="exported")
    assert [r.variant for r in results] == ["transformers, full cache", "kvc: snapkv", "engine (exported): snapkv"]
    full, kvc, engine = results
    assert all(r.prefill_s > 0 and r.decode_tokens_per_s > 0 for r in results)
    # Keys and values of 32 of 64 tokens, plus the int32 position and head of each kept entry.
    kv_heads, head_dim, layers = 2, 16, 2
    assert full.cache_bytes == layers * 2 * kv_heads * 64 * head_dim * 4
    assert kvc.cache_bytes == full.cache_bytes // 2 + layers * 2 * kv_heads * 32 * 4
    # The engine's dense layers return the kept entries' positions only (their heads are implicit).
    assert engine.cache_bytes == full.cache_bytes // 2 + layers * kv_heads * 32 * 4
    assert engine.compile_s > engine.prefill_s  # the build is part of its warm-up
    table = markdown(results, "tiny")
    assert table[4].startswith("| transformers, full cache |") and "1.00×" in table[4]
    assert model.config._attn_implementation == "sdpa"  # restored after the kvc variant
