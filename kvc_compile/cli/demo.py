"""kvc-demo: compress SmolLM2's cache on a long pass-key prompt and compare with the full cache.

Prints each answer, the tokens kept per layer and the bytes the cache holds, measured from the
cache tensors.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from kvc_compile.cache import CompressedCache, cache_nbytes
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.cli.common import UsageError, parse_options, positive_int, user_errors
from kvc_compile.config import CompressionConfig
from kvc_compile.eval.passkey import answer_is_correct, passkey_inputs
from kvc_compile.models import load_model
from kvc_compile.reference import attention_implementation
from kvc_compile.transformers_compat import output_cache, with_cache

MARK = {True: "[green]✓[/green]", False: "[red]✗[/red]"}


def _generate(model, input_ids, max_new_tokens: int, cache=None):
    with torch.no_grad():
        return model.generate(
            input_ids, **with_cache(cache), max_new_tokens=max_new_tokens, do_sample=False,
            return_dict_in_generate=True,
        )


@user_errors("kvc-demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="snapkv")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--compression-ratio", type=float,
                      help="fraction of prompt tokens removed (default 0.5 unless --budget is given)")
    size.add_argument("--budget", type=int, help="tokens kept per KV head (MorphKV's constant-size cache needs it)")
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=3, help="pass-key prompts to answer")
    parser.add_argument("--inner-backend", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option window_size=32 or --option pooling=max (repeatable)")
    args = parser.parse_args(argv)
    console = Console()

    # Everything the user gave is checked before the model loads.
    positive_int("--samples", args.samples)
    positive_int("--context-tokens", args.context_tokens)
    positive_int("--budget", args.budget)
    ratio = 0.5 if args.compression_ratio is None else args.compression_ratio
    size = {"budget": args.budget} if args.budget is not None else {"compression_ratio": ratio}
    options = {"method": args.method, **size, "inner_backend": args.inner_backend}
    for key, value in parse_options(args.option).items():
        if key in ("method", "compression_ratio", "budget", "inner_backend"):
            raise UsageError(f"--option {key}=... : use --{key.replace('_', '-')} instead")
        options[key] = value
    config = CompressionConfig.from_options(options)

    console.print(f"loading [bold]{args.model}[/bold] ...")
    model, tokenizer = load_model(args.model, require_tokenizer=True)
    samples = [passkey_inputs(tokenizer, args.context_tokens, seed) for seed in range(args.samples)]

    full_answers = []
    for _, ids in samples:
        out = _generate(model, ids, 8)
        full_answers.append((tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True), out))

    console.print(f"compiling with backend='kvc' options={options} (the first call compiles; this takes a while) ...")
    model.compile(backend="kvc", options=options, dynamic=True)
    shown = ", ".join(f"{key}={value}" for key, value in size.items())
    table = Table(title=f"pass key in ~{args.context_tokens} tokens of filler: full cache vs {args.method} at {shown}")
    for column in ("key", "full cache", "compressed", "cache bytes full -> compressed"):
        table.add_column(column)
    start = time.perf_counter()
    for (sample, ids), (full_text, full_out) in zip(samples, full_answers, strict=True):
        # The compressed cache keeps the entries' positions (and, for MorphKV, recent queries); packed
        # and low-rank layouts need the kvc attention.
        with attention_implementation(model, ATTENTION_IMPLEMENTATION):
            out = _generate(model, ids, 8, CompressedCache(config=model.config))
        text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        table.add_row(
            sample.answer,
            f"{MARK[answer_is_correct(full_text, sample)]} {full_text.strip()!r}",
            f"{MARK[answer_is_correct(text, sample)]} {text.strip()!r}",
            f"{cache_nbytes(output_cache(full_out)):,} -> {cache_nbytes(output_cache(out)):,}",
        )
        last = out, ids.shape[1]
    console.print(table)
    out, prompt_len = last
    held = [layer.entries_per_head for layer in output_cache(out).layers]  # packed: the heads' mean
    generated = out.sequences.shape[1] - prompt_len - 1  # the last token is never written to the cache
    if config.decode_target is None:
        console.print(f"prompt tokens: {prompt_len}; tokens kept per KV head, per layer, after prefill: "
                      f"{[h - generated for h in held]}")
    else:  # compression while decoding: what prefill kept is gone by now
        console.print(f"prompt tokens: {prompt_len}; entries per KV head, per layer, after {generated} generated "
                      f"tokens (compressed back to {config.decode_target} while decoding): {held}")
    console.print(f"compiled runs took {time.perf_counter() - start:.1f} s including compilation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
