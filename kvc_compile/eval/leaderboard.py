"""A resumable grid of methods x compression ratios x tasks on one model: the text leaderboard.

Every cell (method, ratio, task) is a file of per-sample records under ``out/cells/``, appended
as samples finish, so an interrupted run picks up where it stopped and finished cells are never
recomputed. ``summarize`` turns the cells into JSON, CSV, a Markdown table (mean and confidence
interval per cell, the full-cache row on top) and a plot of score against compression ratio.

Samples are answered through the compiled path by default (``torch.compile(backend="kvc")``), so
the numbers are those of what users run; ``path="reference"`` uses the eager reference instead, and
``path="shared-prefill"`` prefills each sample once and answers every configuration from it with
the reference methods, decoding configurations with caches of one layout as a batch
(``kvc_compile.eval.shared_prefill``): the same answers, many times faster on a CPU.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvc_compile.cache import CompressedCache
from kvc_compile.cache.attention import ATTENTION_IMPLEMENTATION
from kvc_compile.config import CompressionConfig
from kvc_compile.eval.shared_prefill import answer_configs
from kvc_compile.eval.tasks import TaskSample, make_sample, score_cell, string_match_all
from kvc_compile.lookahead import decode_step, lookahead_stage
from kvc_compile.methods import LOWRANK_METHOD, method_class
from kvc_compile.models import attention_head_dim
from kvc_compile.reference import attention_implementation, reference_prefill
from kvc_compile.transformers_compat import with_cache

FULL_CACHE = "full cache"
NEW_TOKENS = {"niah_multivalue": 48, "niah_multiquery": 48, "variable_tracking": 32}
SHARED_PREFILL = "shared-prefill"
PATHS = ("compiled", "reference", SHARED_PREFILL)
SKIPPED = "skipped.json"  # configurations that cannot run on these samples, and why


@dataclass(frozen=True)
class Cell:
    method: str  # FULL_CACHE for the uncompressed row
    ratio: float
    task: str

    @property
    def filename(self) -> str:
        return f"{self.method.replace(' ', '_')}__{self.ratio:g}__{self.task}.jsonl"


def method_options(method: str, ratio: float, extra: dict | None = None, context_tokens: int | None = None,
                   head_dim: int | None = None) -> dict:
    """A cell's options. Constant-size caches (MorphKV) take the ratio as a budget of the context's
    length: ``context_tokens * (1 - ratio)`` entries per KV head. Rank compression (KQ-SVD) takes it
    as the share of each entry's width removed: keys and values at rank ``head_dim * (1 - ratio)``, so a
    ratio frees the same share of cache bytes as eviction does."""
    if method == LOWRANK_METHOD:
        if head_dim is None:
            raise ValueError(f"{method} stores entries at a rank: its rank needs the head dimension")
        rank = max(round(head_dim * (1 - ratio)), 1)
        return {"method": method, "key_rank": rank, "value_rank": rank, **(extra or {})}
    if method_class(method).compresses_while_decoding:
        if context_tokens is None:
            raise ValueError(f"{method} keeps a constant-size cache: its budget needs the context length")
        return {"method": method, "budget": max(round(context_tokens * (1 - ratio)), 1), **(extra or {})}
    return {"method": method, "compression_ratio": ratio, **(extra or {})}


@torch.no_grad()
def answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sample: TaskSample,
    options: dict | None,
    query_aware: bool = False,
    path: str = "compiled",
) -> str:
    """Greedy answer to ``sample``: the context is prefilled (and compressed with ``options``, None
    for the full cache), then the question is fed on that cache and the answer decoded."""
    compressed, appended = sample.prompt_parts(query_aware)
    context_ids = tokenizer(compressed, return_tensors="pt").input_ids
    appended_ids = tokenizer(appended, return_tensors="pt", add_special_tokens=False).input_ids if appended else None
    tokens = answer_ids(model, context_ids, appended_ids, options, NEW_TOKENS.get(sample.task, 12), path,
                        tokenizer.eos_token_id)
    return tokenizer.decode(tokens[0], skip_special_tokens=True)


@torch.no_grad()
def answer_ids(
    model: PreTrainedModel,
    context_ids: Tensor,
    appended_ids: Tensor | None,
    options: dict | None,
    max_new_tokens: int,
    path: str = "compiled",
    eos_token_id: int | None = None,
) -> Tensor:
    """Greedy tokens [batch, max_new_tokens] after ``context_ids`` (prefilled, and compressed with
    ``options``; None for the full cache) and then ``appended_ids`` fed on that cache."""
    full_ids = torch.cat([context_ids, appended_ids], dim=1) if appended_ids is not None else context_ids
    if options is None:
        out = model.generate(full_ids, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        config = CompressionConfig.from_options(options)
        lookahead = config.evicts and config.method_impl.lookahead_queries > 0
        if path == "compiled":  # the caller compiled the model with these options
            cache = CompressedCache(config=model.config)  # sliding-window layers keep their window
            first = model(context_ids, **with_cache(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            _check_compressed(config, cache, context_ids.shape[1], model.config.num_key_value_heads)
            if lookahead:  # LAQ: roll out pseudo tokens after the context, then re-score it
                mask = torch.ones_like(context_ids)
                lookahead_stage(config, decode_step(model, cache), cache, first, mask, eos_token_id)
        elif lookahead or config.decode_target is not None:
            raise ValueError(f"{config.method}: LAQ's rollout and compression while decoding do not run on the "
                             f"reference path in kvc-eval; use --path compiled (or {SHARED_PREFILL})")
        else:
            prefill = reference_prefill(model, context_ids, options)
            cache, first = prefill.cache, prefill.logits[:, -1].argmax(-1, keepdim=True)
        if appended_ids is None:  # query-aware: the prefill's last logits give the first answer token
            full_ids, max_new_tokens = torch.cat([full_ids, first], dim=1), max_new_tokens - 1
            if max_new_tokens == 0:
                return first
        # generate() feeds only what the cache has not seen: the question (or the first answer
        # token), then the answer.
        with attention_implementation(model, ATTENTION_IMPLEMENTATION):
            out = model.generate(full_ids, **with_cache(cache), max_new_tokens=max_new_tokens, do_sample=False)
        if appended_ids is None:
            return out[:, context_ids.shape[1]:]
    return out[:, full_ids.shape[1]:]


def _check_compressed(config: CompressionConfig, cache: CompressedCache, n: int, kv_heads: int) -> None:
    """Fail, rather than score the full cache, when the model ran without the kvc pass (e.g. Dynamo
    fell back to eager after its recompile limit)."""
    if not config.evicts or config.kept_length(n) >= n:
        return
    # Stops at the first layer that holds fewer entries than the prompt has (a compressed layer).
    if all(int((layer.heads >= 0).sum()) >= layer.keys.shape[0] * kv_heads * n for layer in cache.layers):
        raise RuntimeError(f"the model was compiled with {config.method} but its prefill kept all {n} tokens: the "
                           f"kvc pass did not run (was torch._dynamo reset after the previous configuration?)")


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The per-sample records of a cell file (none when it does not exist yet).

    A last line cut short (a run killed while writing it) is not a record: it is skipped, and with
    ``repair`` removed from the file so that the next record starts on a line of its own. Any other
    line that is not a record is an error naming the file and the line.
    """
    if not path.is_file():
        return []
    text = read_text(path, "cell file")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # the file does not end with a newline: the write of this line was cut
                if repair:
                    path.write_text(text[: len(text) - len(line)])
                return records
            raise ValueError(f"{path}:{number} is not a record ({error.msg}); delete the file to recompute "
                             f"that cell") from error
        if not isinstance(record, dict) or "score" not in record:
            raise ValueError(f"{path}:{number} is not a record (no score); delete the file to recompute that cell")
        records.append(record)
    if repair and text and not text.endswith("\n") and lines[-1].strip() and records:
        with path.open("a") as handle:  # a complete last record without its newline
            handle.write("\n")
    return records


def read_text(path: Path, what: str) -> str:
    """A results file as UTF-8 text; a file that is not is named in the error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text ({error.reason} at byte {error.start}); it was not "
                         f"written by kvc-eval: delete it or use another --out") from error


def read_json(path: Path, what: str) -> object:
    """A results folder's JSON file; a corrupt one is named in the error."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error.msg} at line {error.lineno}); delete it or "
                         f"use another --out") from error


class TextTasks:
    """Samples of ``kvc_compile.eval.tasks`` for a model with a tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context_tokens: int, haystack: str = "filler") -> None:
        self.tokenizer, self.context_tokens, self.haystack = tokenizer, context_tokens, haystack
        self.settings = {"context_tokens": context_tokens, "haystack": haystack}

    def record(self, model, task: str, seed: int, options: dict | None, query_aware: bool, path: str) -> dict:
        sample = make_sample(self.tokenizer, task, self.context_tokens, seed, self.haystack)
        prediction = answer(model, self.tokenizer, sample, options, query_aware, path)
        return {"seed": seed, "prediction": prediction, "answers": list(sample.answers),
                "score": string_match_all(prediction, sample.answers)}

    def records(self, model, task: str, seed: int, configs: Sequence[dict | None], query_aware: bool) -> list[dict]:
        """One record per configuration for one sample, all from one prefill (the shared-prefill path)."""
        sample = make_sample(self.tokenizer, task, self.context_tokens, seed, self.haystack)
        compressed, appended = sample.prompt_parts(query_aware)
        context_ids = self.tokenizer(compressed, return_tensors="pt").input_ids
        appended_ids = (self.tokenizer(appended, return_tensors="pt", add_special_tokens=False).input_ids
                        if appended else None)
        answers = answer_configs(model, context_ids, appended_ids, configs, NEW_TOKENS.get(task, 12),
                                 self.tokenizer.eos_token_id)
        predictions = [self.tokenizer.decode(tokens[0], skip_special_tokens=True) for tokens in answers]
        return [{"seed": seed, "prediction": p, "answers": list(sample.answers),
                 "score": string_match_all(p, sample.answers)} for p in predictions]


def run_grid(
    model: PreTrainedModel,
    source: TextTasks,
    out: Path,
    methods: Sequence[str],
    ratios: Sequence[float],
    tasks: Sequence[str],
    samples: int,
    query_aware: bool = False,
    path: str = "compiled",
    extra_options: dict[str, dict] | None = None,
    compile_model: Callable[[PreTrainedModel, dict], None] | None = None,
    model_settings: dict | None = None,
) -> list[Cell]:
    """Fill every cell of the grid (plus the full-cache row), skipping samples already recorded.

    ``out/settings.json`` records what makes a cell's samples (the model: ``model_settings``, e.g.
    its name and weights, and its architecture and dtype; the task source's settings; the method
    options; the path), and a folder made with other settings is refused rather than mixed.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid choices: {', '.join(PATHS)}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    bad = [r for r in ratios if not 0 <= r < 1]  # NaN fails this too
    if bad:
        raise ValueError(f"compression ratios must be finite numbers in [0, 1) (the fraction of tokens removed), "
                         f"got {', '.join(f'{r:g}' for r in bad)}")
    if not methods or not tasks:
        raise ValueError("the grid needs at least one method and one task")
    methods, ratios = list(dict.fromkeys(methods)), list(dict.fromkeys(ratios))  # a repeat would record twice
    cells_dir = out / "cells"
    # Samples and the grid's methods, ratios and tasks are not part of it: records are per cell and
    # per seed, so a larger --samples or another method extends the folder.
    settings = {**source.settings, "model": {**(model_settings or {}), **architecture(model)},
                "method_options": extra_options or {}, "query_aware": query_aware, "path": path}
    _check_settings(out / "settings.json", json.loads(json.dumps(settings, default=str)))
    cells_dir.mkdir(parents=True, exist_ok=True)
    configs, skipped = [(FULL_CACHE, 0.0, None)], {}
    for method, ratio in ((m, r) for m in methods for r in ratios):
        options = method_options(method, ratio, (extra_options or {}).get(method), source.context_tokens,
                                 attention_head_dim(model.config))
        try:
            CompressionConfig.from_options(options)
        except ValueError as error:  # e.g. a constant-size cache smaller than its window at this ratio
            skipped[f"{method} {ratio:g}"] = str(error)
            tqdm.write(f"kvc-eval: skipping {method} at ratio {ratio:g}: {error}")
            continue
        configs.append((method, ratio, options))
    (out / SKIPPED).write_text(json.dumps(skipped, indent=1))
    if path == SHARED_PREFILL:
        return _run_shared_prefill(model, source, cells_dir, configs, tasks, samples, query_aware)
    cells = []
    for method, ratio, options in tqdm(configs, desc="configurations"):
        todo = [Cell(method, ratio, task) for task in tasks]
        cells += todo
        done = {cell: len(read_records(cells_dir / cell.filename, repair=True)) for cell in todo}
        if all(n >= samples for n in done.values()):
            continue  # finished: never recomputed
        if options is not None and path == "compiled":
            (compile_model or _compile)(model, options)
        try:
            for cell in todo:
                with (cells_dir / cell.filename).open("a") as records:
                    for seed in tqdm(range(done[cell], samples), desc=f"{method} {ratio:g} {cell.task}", leave=False):
                        record = source.record(model, cell.task, seed, options, query_aware, path)
                        records.write(json.dumps(record) + "\n")
                        records.flush()
        finally:
            # Back to eager, and a fresh Dynamo cache: past its recompile limit Dynamo would run the
            # next configurations eagerly, without compression.
            model._compiled_call_impl = None
            torch._dynamo.reset()
    return cells


def _run_shared_prefill(model, source, cells_dir: Path, configs: list[tuple], tasks: Sequence[str], samples: int,
                        query_aware: bool) -> list[Cell]:
    """The grid sample by sample: each sample is prefilled once and every configuration still missing
    it is answered from that prefill. Seeds advance together across tasks, so a stopped run leaves
    every task with about as many samples; each cell is appended in seed order and resumes as above."""
    cells = [Cell(method, ratio, task) for method, ratio, _ in configs for task in tasks]
    done = {cell: len(read_records(cells_dir / cell.filename, repair=True)) for cell in cells}
    for seed in tqdm(range(min(done.values()), samples), desc="samples per cell"):
        for task in tasks:
            todo = [(Cell(m, r, task), options) for m, r, options in configs if done[Cell(m, r, task)] == seed]
            if not todo:
                continue
            records = source.records(model, task, seed, [options for _, options in todo], query_aware)
            for (cell, _), record in zip(todo, records, strict=True):
                with (cells_dir / cell.filename).open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                done[cell] += 1
    return cells


def _compile(model: PreTrainedModel, options: dict) -> None:
    model.compile(backend="kvc", options=options, dynamic=True)


def architecture(model: PreTrainedModel) -> dict:
    """What a results folder records of a model's architecture and precision."""
    config = model.config
    fields = {"model_type": "model_type", "layers": "num_hidden_layers", "hidden_size": "hidden_size",
              "attention_heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab_size": "vocab_size"}
    return {**{key: getattr(config, name, None) for key, name in fields.items()},
            "dtype": str(model.dtype).removeprefix("torch.")}


def _check_settings(path: Path, settings: dict) -> None:
    """A results folder holds one setting: resuming with other settings would mix samples."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))
        return
    _refuse_other_settings(path, settings_diff(_read_settings(path), settings))


def check_resume(out: Path, settings: dict) -> None:
    """Refuse early (before a model loads) a results folder made with other settings, or whose cell
    files do not hold records: ``settings`` holds the settings known so far, and only they are compared."""
    path = out / "settings.json"
    if path.is_file():
        settings = json.loads(json.dumps(settings, default=str))  # as they would be saved: tuples as lists
        _refuse_other_settings(path, settings_diff(_read_settings(path), settings, given_only=True))
    for cell in sorted((out / "cells").glob("*.jsonl")):
        read_records(cell)


def _read_settings(path: Path) -> dict:
    saved = read_json(path, "settings file")
    if not isinstance(saved, dict):
        raise ValueError(f"settings file {path} is not a JSON object; delete it or use another --out")
    return saved


def _refuse_other_settings(path: Path, differing: list[str]) -> None:
    if differing:
        raise ValueError(f"{path.parent} holds results for other settings: {'; '.join(differing)}. Use a new "
                         f"--out, or resume with the same settings")


def settings_diff(saved: dict, settings: dict, prefix: str = "", given_only: bool = False) -> list[str]:
    """``key (was ..., now ...)`` for every setting that differs, nested keys dotted; ``given_only``
    compares only the keys of ``settings``."""
    differing = []
    for key in sorted(set(settings) if given_only else set(saved) | set(settings)):
        old, new = saved.get(key, "(not recorded)"), settings.get(key, "(not recorded)")
        if isinstance(old, dict) and isinstance(new, dict) and old and new:
            differing += settings_diff(old, new, f"{prefix}{key}.", given_only)
        elif old != new:
            differing.append(f"{prefix}{key} (was {json.dumps(old)}, now {json.dumps(new)})")
    return differing


@dataclass(frozen=True)
class CellResult:
    method: str
    ratio: float
    task: str
    mean: float
    low: float
    high: float
    samples: int


def summarize(out: Path, cells: Sequence[Cell], title: str) -> list[CellResult]:
    """Write results.json, results.csv, leaderboard.md and leaderboard.png from the cell files."""
    results = []
    for cell in cells:
        scores = [r["score"] for r in read_records(out / "cells" / cell.filename)]
        if scores:
            s = score_cell(scores)
            results.append(CellResult(cell.method, cell.ratio, cell.task, s.mean, s.low, s.high, s.samples))
    rows = [asdict(r) for r in results]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
    skipped_path = out / SKIPPED
    skipped = read_json(skipped_path, "file") if skipped_path.is_file() else {}
    if not isinstance(skipped, dict):
        raise ValueError(f"{skipped_path} is not a JSON object; delete it and run again")
    notes = "".join(f"\n- not run: {config}: {reason}" for config, reason in skipped.items())
    (out / "leaderboard.md").write_text(markdown_table(results, title) + notes + ("\n" if notes else ""))
    plot(results, out / "leaderboard.png", title)
    return results


def markdown_table(results: Sequence[CellResult], title: str) -> str:
    tasks = sorted({r.task for r in results})
    counts = sorted({r.samples for r in results}) or [0]
    samples = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    lines = [f"# {title}", "", f"Mean string-match score (95 % confidence interval) per task, then the average; "
             f"{samples} samples per cell.", "",
             "| method | ratio | " + " | ".join(tasks) + " | average |", "|---|---|" + "---|" * (len(tasks) + 1)]
    by_config: dict[tuple[str, float], dict[str, CellResult]] = {}
    for r in results:
        by_config.setdefault((r.method, r.ratio), {})[r.task] = r
    for (method, ratio), per_task in by_config.items():
        cells = [f"{per_task[t].mean:.2f} ({per_task[t].low:.2f}–{per_task[t].high:.2f})" if t in per_task else "—"
                 for t in tasks]
        average = sum(c.mean for c in per_task.values()) / len(per_task)
        lines.append(f"| {method} | {ratio:g} | " + " | ".join(cells) + f" | {average:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[CellResult], path: Path, title: str) -> None:
    """Average score vs compression ratio, a line per method, the full cache dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    averages: dict[str, dict[float, list[float]]] = {}
    for r in results:
        averages.setdefault(r.method, {}).setdefault(r.ratio, []).append(r.mean)
    figure, axes = plt.subplots(figsize=(9, 5))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>ph*"
    for index, (method, per_ratio) in enumerate(averages.items()):
        if method == FULL_CACHE:
            full = sum(per_ratio[0.0]) / len(per_ratio[0.0])
            axes.axhline(full, linestyle="--", color="black", label=FULL_CACHE)
            continue
        ratios = sorted(per_ratio)
        axes.plot(ratios, [sum(per_ratio[x]) / len(per_ratio[x]) for x in ratios], label=method,
                  color=colors[index % len(colors)], marker=markers[index % len(markers)])
    axes.set_xlabel("compression ratio (fraction of tokens removed)")
    axes.set_ylabel("average score")
    axes.set_ylim(0, 1.02)
    axes.set_title(textwrap.fill(title, 80), fontsize=9)
    axes.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")  # beside the lines, not on them
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
