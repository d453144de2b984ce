"""kvc-run: generate with an engine directory built by kvc-build.

    kvc-run engine/ --prompt-file long.txt --max-new-tokens 64
    kvc-run engine/ --prompt "Hi" --prompt "Hello" --temperature 0.7 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from kvc_compile.engine import Engine, EngineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvc-run", description=__doc__.splitlines()[0])
    parser.add_argument("engine", help="the directory kvc-build wrote")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one batch)")
    parser.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one prompt")
    parser.add_argument("--token-ids", action="append", default=[],
                        help="a prompt as space-separated token ids (engines built without a tokenizer)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list instead of text: per prompt its token count, tokens and text")
    args = parser.parse_args(argv)
    console = Console()
    errors = Console(stderr=True)
    try:
        prompts: list = list(args.prompt)
        for file in args.prompt_file:
            path = Path(file)
            if not path.is_file():
                raise EngineError(f"--prompt-file {file} does not exist")
            prompts.append(path.read_text())
        ids = [[int(token) for token in item.split()] for item in args.token_ids]
        if prompts and ids:
            raise EngineError("give text prompts or --token-ids, not both")
        if not prompts and not ids:
            raise EngineError("nothing to generate from: give --prompt, --prompt-file or --token-ids")
        engine = Engine.load(args.engine)
        if args.chat and prompts:
            if engine.tokenizer is None:
                raise EngineError("--chat needs the engine's tokenizer, and this engine has none")
            prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                            add_generation_prompt=True) for p in prompts]
        batch = prompts or ids
        streams = len(batch) == 1 and engine.tokenizer is not None and not args.json
        stream = _Streamer(engine, console) if streams else None
        result = engine.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, on_token=stream)
    except (EngineError, ValueError) as error:
        errors.print(f"[red]kvc-run: {error}[/red]")
        return 2
    if args.json:
        texts = result.texts or [None] * len(result.tokens)
        rows = [{"prompt_tokens": n, "tokens": tokens, "text": text}
                for n, tokens, text in zip(result.prompt_lengths, result.tokens, texts, strict=True)]
        print(json.dumps(rows))
    elif stream is not None:
        console.print()
    else:
        for i, row in enumerate(result.texts or result.tokens):
            console.print(f"[bold]#{i}[/bold] {row}")
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
