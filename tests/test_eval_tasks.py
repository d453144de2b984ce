"""Locally generated retrieval tasks: deterministic, the answers really in the haystack and
findable, the length close to what was asked; RULER's string match and the cell's interval."""

import math
from types import SimpleNamespace

import pytest

from kvc_compile.eval.tasks import HAYSTACKS, TASKS, make_sample, score_cell, string_match_all


class WordTokenizer:
    """Counts words as tokens: enough to size haystacks in fast tests."""

    def __call__(self, text):
        return SimpleNamespace(input_ids=text.split())


TOKENIZER = WordTokenizer()


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_hold_their_answers_once(task, haystack):
    sample = make_sample(TOKENIZER, task, 1000, seed=3, haystack=haystack)
    assert sample == make_sample(TOKENIZER, task, 1000, seed=3, haystack=haystack)
    assert sample.context != make_sample(TOKENIZER, task, 1000, seed=4, haystack=haystack).context
    for answer in sample.answers:
        # Each expected string is in the compressed context, exactly where its needle put it.
        assert answer in sample.context
        assert answer not in sample.question or task == "variable_tracking"
    assert abs(len(sample.context.split()) - 1000) <= 60
    # Query-agnostic by default: the question is fed after compression; query-aware moves it inside.
    assert sample.prompt_parts() == (sample.context, sample.question)
    assert sample.prompt_parts(query_aware=True) == (sample.context + sample.question, "")


def test_needles_are_unique_so_the_answer_is_findable():
    sample = make_sample(TOKENIZER, "niah_multikey", 2000, seed=5, haystack="pydoc")
    (answer,) = sample.answers
    assert sample.context.count(answer) == 1
    key = sample.question.split(" for ")[1].split(" mentioned")[0]
    assert sample.context.count(f"magic numbers for {key} is: {answer}") == 1
    assert sample.context.count("special magic numbers for") == 4  # three distractors


def test_variable_chain_reads_top_to_bottom():
    sample = make_sample(TOKENIZER, "variable_tracking", 800, seed=2)
    names = sample.answers
    positions = [sample.context.index(f"VAR {name} =") for name in names]
    assert positions == sorted(positions) and len(set(names)) == 4
    value = sample.question.split("the value ")[1].split(" ")[0]
    assert f"VAR {names[0]} = {value}." in sample.context
    assert f"VAR {names[3]} = VAR {names[2]}." in sample.context


def test_unknown_task_or_haystack_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: passkey"):
        make_sample(TOKENIZER, "qa", 500, seed=0)
    with pytest.raises(ValueError, match="valid haystacks: filler, pydoc"):
        make_sample(TOKENIZER, "passkey", 500, seed=0, haystack="wiki")


def test_string_match_all_by_hand():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The number is 123.", ["123", "456"]) == 0.5
    assert string_match_all("ABCDE and fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)


def test_wilson_interval_by_hand():
    # 8 of 10 correct at 95 %: Wilson gives (0.4902, 0.9433).
    cell = score_cell([1] * 8 + [0] * 2)
    assert cell.mean == 0.8 and cell.samples == 10
    assert cell.low == pytest.approx(0.4902, abs=1e-4) and cell.high == pytest.approx(0.9433, abs=1e-4)
    # Fractional scores: mean +- 1.96 standard errors.
    cell = score_cell([0.5, 1.0, 0.5, 1.0])
    assert cell.low == pytest.approx(0.75 - 1.96 * math.sqrt(1 / 12 / 4))
    with pytest.raises(ValueError, match="at least one sample"):
        score_cell([])


@pytest.mark.smollm2
def test_real_tokenizer_sizes_and_keeps_the_needles(smollm2):
    _, tokenizer = smollm2
    for task in TASKS:
        sample = make_sample(tokenizer, task, 2048, seed=1, haystack="pydoc")
        tokens = len(tokenizer(sample.context).input_ids)
        assert 1900 <= tokens <= 2200, (task, tokens)
        assert all(answer in sample.context for answer in sample.answers)
