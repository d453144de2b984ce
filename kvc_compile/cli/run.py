"""kvc-run: generate with an engine directory built by kvc-build.

    kvc-run engine/ --prompt-file long.txt --max-new-tokens 64
    kvc-run engine/ --prompt "Hi" --prompt "Hello" --temperature 0.7 --seed 0
    kvc-run engine/ --token-ids "1 2 3"        # engines built without a tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from rich.console import Console
from rich.markup import escape

from kvc_compile.cli.common import UsageError, read_text_file, user_errors
from kvc_compile.engine import Engine

# Without --max-new-tokens: enough for a short answer, not the engine's whole decode capacity.
DEFAULT_NEW_TOKENS = 64

SAFETY = """\
Loading an engine runs its code: an AOTInductor engine (kvc-build's default target) is a compiled
library whose native code runs as it loads, like any shared library, and an engine built with
--target exported is partly unpickled, which can run any code, so kvc-run refuses it without
--trust-engine. The manifest's SHA-256s detect damaged or accidentally edited files, not an
attacker (who can edit the manifest too): only run engines you built or whose source you trust."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvc-run", description=__doc__.splitlines()[0], epilog=SAFETY,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", help="the directory kvc-build wrote")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one batch)")
    parser.add_argument("--prompt-file", action="append", default=[], help="a UTF-8 file whose text is one prompt")
    parser.add_argument("--token-ids", action="append", default=[],
                        help="a prompt as space-separated token ids, each in [0, vocab size) (for engines built "
                             "without a tokenizer, e.g. from --weights random)")
    parser.add_argument("--chat", action="store_true", help="wrap each text prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"tokens to generate per prompt, at most; decoding stops earlier at EOS (default: "
                             f"{DEFAULT_NEW_TOKENS}, or the engine's decode capacity if smaller)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; more: sampling")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (1: off)")
    parser.add_argument("--seed", type=int, help="seed of the sampler, for repeatable sampling")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list instead of text: per prompt its token count, tokens and text")
    parser.add_argument("--trust-engine", action="store_true",
                        help="load an engine built with --target exported, whose files are partly unpickled: "
                             "only for engines you built or trust (see below)")
    return parser


def parse_token_ids(item: str) -> list[int]:
    ids = []
    for word in item.split():
        try:
            ids.append(int(word))
        except ValueError:
            raise UsageError(f"--token-ids {item!r}: {word!r} is not a token id; give space-separated integers, "
                             f"e.g. --token-ids '1 2 3'") from None
    if not ids:
        raise UsageError(f"--token-ids {item!r} holds no token ids; give space-separated integers, e.g. "
                         f"--token-ids '1 2 3'")
    return ids


@user_errors("kvc-run")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Checked before the engine loads (seconds to minutes); Engine.generate checks them again.
    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be 0 or more, got {args.top_k}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    prompts: list[str] = list(args.prompt)
    prompts += [read_text_file(file, "--prompt-file") for file in args.prompt_file]
    ids = [parse_token_ids(item) for item in args.token_ids]
    if prompts and ids:
        raise UsageError("give text prompts (--prompt, --prompt-file) or --token-ids, not both")
    if not prompts and not ids:
        raise UsageError("nothing to generate from: give --prompt, --prompt-file or --token-ids")
    if args.chat and not prompts:
        raise UsageError("--chat wraps text prompts in the chat template; --token-ids are passed as they are")

    engine = Engine.load(args.engine, trusted=args.trust_engine)
    if args.chat:
        if engine.tokenizer is None:
            raise UsageError("--chat needs the engine's tokenizer, and this engine has none")
        if not getattr(engine.tokenizer, "chat_template", None):
            raise UsageError("--chat: this engine's tokenizer has no chat template; leave out --chat")
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True) for p in prompts]
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, engine.manifest.max_new_tokens)
    console = Console()
    errors = Console(stderr=True)
    batch = prompts or ids
    streams = len(batch) == 1 and engine.tokenizer is not None and not args.json
    stream = _Streamer(engine, console) if streams else None
    result = engine.generate(batch, max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, on_token=stream)
    if args.json:
        texts = result.texts or [None] * len(result.tokens)
        rows = [{"prompt_tokens": n, "tokens": tokens, "text": text}
                for n, tokens, text in zip(result.prompt_lengths, result.tokens, texts, strict=True)]
        print(json.dumps(rows))
    elif stream is not None:
        console.print()
    else:
        for i, row in enumerate(result.texts or result.tokens):
            console.print(f"[bold]#{i}[/bold] {escape(str(row))}")  # generated text is not markup
    for note in result.notes:
        print(f"kvc-run: note: {note}", file=sys.stderr)
    generated = sum(map(len, result.tokens))
    errors.print(f"prefill {result.prefill_seconds * 1e3:.0f} ms, decode {generated} tokens in "
                 f"{result.decode_seconds:.2f} s")
    return 0


class _Streamer:
    """Prints a single prompt's completion as its tokens arrive (decoding the whole text each time,
    so multi-token characters come out whole)."""

    def __init__(self, engine: Engine, console: Console) -> None:
        self.engine, self.console, self.tokens, self.printed = engine, console, [], ""

    def __call__(self, step: int, token) -> None:
        self.tokens.append(int(token[0]))
        if self.tokens[-1] in self.engine.manifest.eos_token_ids:
            return
        text = self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.console.print(text[len(self.printed):], end="", markup=False, highlight=False, soft_wrap=True)
        self.printed = text


if __name__ == "__main__":
    sys.exit(main())
