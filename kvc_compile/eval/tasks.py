"""Long-context retrieval tasks generated locally, in the spirit of RULER (Hsieh et al., 2024).

Nothing is downloaded: haystacks are RULER's repetitive filler or real English that ships with
Python (``pydoc_data.topics``), needles are seeded random words and numbers. Every sample is a
function of (task, haystack, context length, seed), so every run of a configuration sees the same
samples. A sample is split into the ``context`` (what is prefilled and compressed) and the
``question`` (appended after compression by default, as kvpress does; ``query_aware`` puts it
inside the compressed part).

Tasks (RULER's names in brackets):

* ``passkey``: one 5-digit key in the haystack.
* ``niah_single`` [niah_single]: one "special magic number" for one key word.
* ``niah_multikey`` [niah_multikey_1]: four keys, each with its own number; asks for one.
* ``niah_multivalue`` [niah_multivalue]: one key with four numbers; asks for all of them.
* ``niah_multiquery`` [niah_multiquery]: four keys with their numbers; asks for all four.
* ``variable_tracking`` [vt]: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ...; asks for every
  variable that holds the value.

Scoring follows RULER's string match: the fraction of expected strings found in the answer
(``all``), with a confidence interval for a cell of samples.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HAYSTACKS = ("filler", "pydoc")
TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
# Key words for needles: common, single-token-ish English nouns, distinct from the filler's words.
KEY_WORDS = (
    "apple", "river", "candle", "mirror", "garden", "rocket", "violin", "harbor", "pencil", "castle",
    "meadow", "lantern", "anchor", "falcon", "marble", "tunnel", "cactus", "glacier", "compass", "saddle",
    "thunder", "velvet", "orchid", "beacon", "quartz", "walnut", "canyon", "ember", "jigsaw", "pepper",
)
VARIABLE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class TaskSample:
    task: str
    haystack: str
    seed: int
    context: str  # instructions + haystack with the needles: the part that is compressed
    question: str  # the query and the answer's opening words
    answers: tuple[str, ...]  # every one must appear in the generated text for full credit

    def prompt_parts(self, query_aware: bool = False) -> tuple[str, str]:
        """(text prefilled and compressed, text fed after compression)."""
        if query_aware:
            return self.context + self.question, ""
        return self.context, self.question


def _needle_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _task_needles(task: str, rng: random.Random) -> tuple[list[str], str, tuple[str, ...]]:
    """(needle sentences, question, answers) of one sample."""
    keys = rng.sample(KEY_WORDS, 4)
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return [needle], "What is the pass key? The pass key is", (key,)
    if task == "variable_tracking":
        value = str(rng.randint(10000, 99999))
        names: list[str] = []
        while len(names) < 4:
            name = "".join(rng.choice(VARIABLE_LETTERS) for _ in range(5))
            names += [name] if name not in names else []
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
        question = (f"Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: the variables assigned the value {value} are:")
        return chain, question, tuple(names)
    numbers = [_needle_number(rng) for _ in range(4)]
    if task == "niah_single":
        needles = [f"One of the special magic numbers for {keys[0]} is: {numbers[0]}."]
        return needles, _niah_question([keys[0]]), (numbers[0],)
    if task == "niah_multikey":
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, numbers, strict=True)]
        asked = rng.randrange(4)
        return needles, _niah_question([keys[asked]]), (numbers[asked],)
    if task == "niah_multivalue":
        needles = [f"One of the special magic numbers for {keys[0]} is: {v}." for v in numbers]
        question = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                    f"The special magic numbers for {keys[0]} mentioned in the provided text are")
        return needles, question, tuple(numbers)
    if task == "niah_multiquery":
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, numbers, strict=True)]
        return needles, _niah_question(keys), tuple(numbers)
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _niah_question(keys: Sequence[str]) -> str:
    if len(keys) == 1:
        return (f"What is the special magic number for {keys[0]} mentioned in the provided text? "
                f"The special magic number for {keys[0]} mentioned in the provided text is")
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return (f"What are the special magic numbers for {listed} mentioned in the provided text? "
            f"The special magic numbers for {listed} mentioned in the provided text are")


@lru_cache(maxsize=1)
def pydoc_sentences() -> tuple[str, ...]:
    """Python's own reference text, cut into sentences (the real-English haystack)."""
    import pydoc_data.topics

    text = " ".join(" ".join(body.split()) for _, body in sorted(pydoc_data.topics.topics.items()))
    return tuple(s.strip() + "." for s in text.split(". ") if len(s.split()) >= 4)


def _haystack_sentences(haystack: str, rng: random.Random) -> Iterator[str]:
    """An endless stream of haystack sentences (pydoc: from a seeded offset, wrapping around)."""
    if haystack == "filler":
        return itertools.cycle([s.strip() + "." for s in FILLER.split(".") if s.strip()])
    if haystack == "pydoc":
        sentences = pydoc_sentences()
        start = rng.randrange(len(sentences))
        return itertools.cycle(sentences[start:] + sentences[:start])
    raise ValueError(f"unknown haystack {haystack!r}; valid haystacks: {', '.join(HAYSTACKS)}")


INSTRUCTION = ("Some special magic numbers and facts are hidden inside the following text. Make sure to "
               "memorize them. I will quiz you about them afterwards.\n\n")


def make_sample(
    tokenizer: PreTrainedTokenizerBase, task: str, context_tokens: int, seed: int, haystack: str = "filler"
) -> TaskSample:
    """A sample whose context is about ``context_tokens`` tokens, needles at seeded depths."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; valid haystacks: {', '.join(HAYSTACKS)}")
    # The seed fixes needles, depths and haystack offset; the task and haystack names vary it too.
    rng = random.Random(f"{task}/{haystack}/{seed}")
    needles, question, answers = _task_needles(task, rng)
    budget = context_tokens - len(tokenizer(INSTRUCTION + " ".join(needles)).input_ids)
    sentences: list[str] = []
    for sentence in _haystack_sentences(haystack, rng):
        # Sentence by sentence: the sum of their token counts is within a few tokens of the whole's.
        budget -= len(tokenizer(" " + sentence).input_ids)
        if budget < 0:
            break
        sentences.append(sentence)
    count = len(sentences)
    # Needles at sorted random depths, in order (a variable chain must read top to bottom).
    depths = sorted(rng.randrange(count + 1) for _ in needles)
    for offset, (depth, needle) in enumerate(zip(depths, needles, strict=True)):
        sentences.insert(depth + offset, needle)
    context = INSTRUCTION + " ".join(sentences) + "\n\n"
    return TaskSample(task, haystack, seed, context, question, answers)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's metric: the fraction of expected strings that appear in the prediction (case-insensitive)."""
    lowered = prediction.lower()
    return sum(answer.lower() in lowered for answer in answers) / len(answers)


@dataclass(frozen=True)
class CellScore:
    mean: float
    low: float
    high: float
    samples: int


def score_cell(scores: Sequence[float], confidence: float = 0.95) -> CellScore:
    """Mean score of a cell and its confidence interval: Wilson's for 0/1 scores, else the normal one."""
    n = len(scores)
    if n == 0:
        raise ValueError("a cell needs at least one sample")
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(confidence)
    if z is None:
        raise ValueError(f"confidence must be 0.9, 0.95 or 0.99, got {confidence}")
    mean = sum(scores) / n
    if all(s in (0, 1) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return CellScore(mean, max(0.0, centre - half), min(1.0, centre + half), n)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1) / n)
    return CellScore(mean, max(0.0, mean - z * spread), min(1.0, mean + z * spread), n)
