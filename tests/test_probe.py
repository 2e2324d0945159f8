"""The long-range probe tasks: lengths, depths, answers that only the planted facts give, SCROLLS-format files."""

from __future__ import annotations

import random
import re

import pytest

from scrolls_ssm.data import group_references, load_scrolls
from scrolls_ssm.metrics import compute_scrolls_metrics
from scrolls_ssm.probe import (
    PROBE_SCROLLS_TASK,
    PROBE_TASKS,
    TRAINING_TASKS,
    count_words,
    parse_probe_id,
    probe_example,
    probe_naive_baseline,
    probe_scores,
    probe_vocabulary,
    write_probe_dataset,
)
from scrolls_ssm.synthetic import filler_sentence

MAX_FILLER_WORDS = max(count_words(filler_sentence(random.Random(seed))) for seed in range(500))


@pytest.mark.parametrize("task", PROBE_TASKS)
@pytest.mark.parametrize("length", [300, 2000])
def test_inputs_fill_to_the_target_length(task, length):
    for seed in range(5):
        text, _ = probe_example(task, length, 50, random.Random(seed))
        assert length - MAX_FILLER_WORDS <= count_words(text) <= length


def test_length_is_counted_with_the_given_tokenizer(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    text, _ = probe_example("single_needle", 800, 30, random.Random(0), count_tokens=count)
    # Pieces join across sentence boundaries, so the whole can differ from the sum by a few tokens.
    assert 800 - 3 * MAX_FILLER_WORDS <= count(text) <= 800 + 10


@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_the_needle_sits_at_its_depth(depth):
    text, answer = probe_example("single_needle", 3000, depth, random.Random(depth))
    document = text.split("\n\n", 1)[1]
    sentences = re.split(r"(?<=\.) ", document)
    position = next(i for i, sentence in enumerate(sentences) if answer in sentence)
    assert position / (len(sentences) - 1) == pytest.approx(depth / 100, abs=0.01)


def test_only_the_planted_facts_give_the_answer():
    for seed in range(20):
        text, answer = probe_example("single_needle", 500, 40, random.Random(seed))
        assert text.count(answer) == 1 and text.count("special magic number") == 2  # question + needle

        text, answer = probe_example("multi_key_needle", 800, 40, random.Random(seed))
        question, document = text.split("\n\n", 1)
        key = re.fullmatch(r"What is the special magic number for the (.+)\?", question).group(1)
        needles = dict(re.findall(r"special magic number for the ([a-z ]+) is (\d+) \.", document))
        assert len(needles) == 4 and needles[key] == answer

        text, answer = probe_example("aggregation", 800, None, random.Random(seed))
        counts = {
            word: text.count(f"marked word is {word} .") for word in set(re.findall(r"marked word is (\w+) \.", text))
        }
        assert len(counts) == 5 and max(counts, key=counts.get) == answer
        assert sorted(counts.values()).count(counts[answer]) == 1


def test_multi_query_needle_asks_every_key_in_its_own_order_and_answers_their_values_in_that_order():
    in_document_order = 0
    for seed in range(40):
        text, answer = probe_example("multi_query_needle", 800, 40, random.Random(seed))
        question, document = text.split("\n\n", 1)
        asked = re.fullmatch(r"What are the special magic numbers for the (.+)\?", question).group(1)
        keys = re.split(r", the | and the ", asked)
        needles = re.findall(r"special magic number for the ([a-z ]+) is (\d+) \.", document)
        assert len(keys) == 4 and sorted(keys) == sorted(key for key, _ in needles)
        values = dict(needles)
        assert answer == " ".join(values[key] for key in keys)
        assert all(text.count(values[key]) == 1 for key in keys)  # each value only in its needle
        in_document_order += keys == [key for key, _ in needles]
    assert in_document_order <= 6  # asked in the document's order by chance only (1 in 24)
    assert count_words(text) <= 800


def test_training_tasks_add_training_rows_only(tmp_path):
    write_probe_dataset(
        tmp_path,
        tasks=["multi_key_needle"],
        training_tasks=TRAINING_TASKS,
        train_lengths=(200,),
        num_train_per_length=10,
        eval_lengths=(300,),
        depths=(0, 100),
        num_eval_per_cell=2,
    )
    train = load_scrolls(PROBE_SCROLLS_TASK, "train", data_files=str(tmp_path))
    validation = load_scrolls(PROBE_SCROLLS_TASK, "validation", data_files=str(tmp_path))
    assert sorted({row["id"].split(".")[0] for row in train}) == ["multi_key_needle", "multi_query_needle"]
    assert len(train) == 20 and {row["id"].split(".")[0] for row in validation} == {"multi_key_needle"}
    with pytest.raises(ValueError, match=r"unknown training task\(s\) \['single_needle'\]; valid training"):
        write_probe_dataset(tmp_path, training_tasks=["single_needle"])


def test_variable_tracking_answer_is_the_chain_of_the_asked_value():
    for seed in range(20):
        text, answer = probe_example("variable_tracking", 1000, 20, random.Random(seed))
        question, document = text.split("\n\n", 1)
        value = re.fullmatch(r"Which variables are assigned the value (\d+)\?", question).group(1)
        assignments = re.findall(r"VAR (X\d{3}) = (\w+) \.", document)
        holds = {}
        for name, source in assignments:  # in document order: a copy always follows its source
            holds[name] = holds[source] if source in holds else source
        chain = [name for name, _ in assignments if holds[name] == value]
        assert " ".join(chain) == answer and 3 <= len(chain) <= 5
        assert len(assignments) == 2 * len(chain)  # the distractor chain is as long


def test_dataset_loads_as_scrolls_and_scores_per_cell(tmp_path):
    write_probe_dataset(
        tmp_path, train_lengths=(200, 400), num_train_per_length=30, eval_lengths=(300, 600), num_eval_per_cell=2
    )
    train = load_scrolls(PROBE_SCROLLS_TASK, "train", data_files=str(tmp_path))
    validation = load_scrolls(PROBE_SCROLLS_TASK, "validation", data_files=str(tmp_path))
    assert len(train) == 4 * 2 * 30
    # 3 tasks x 2 lengths x 5 depths x 2, plus aggregation x 2 lengths x 2
    assert len(validation) == 3 * 2 * 5 * 2 + 2 * 2
    _, references = group_references(validation)

    perfect = {id_: answers[0] for id_, answers in references.items()}
    assert compute_scrolls_metrics(PROBE_SCROLLS_TASK, perfect, references)["exact_match"] == 100.0
    wrong_deep = {id_: "no" if parse_probe_id(id_)[2] == 100 else answer for id_, answer in perfect.items()}
    scores = probe_scores(wrong_deep, references)
    assert scores[("single_needle", 600, 100)] == 0.0 and scores[("single_needle", 600, 0)] == 100.0
    assert scores[("aggregation", 300, None)] == 100.0 and len(scores) == 3 * 2 * 5 + 2

    baseline = probe_naive_baseline(train, references)
    assert set(baseline) == set(PROBE_TASKS)
    assert baseline["single_needle"] == baseline["multi_key_needle"] == baseline["variable_tracking"] == 0.0
    assert baseline["aggregation"] <= 50.0


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown probe task 'needle'; valid tasks: single_needle"):
        probe_example("needle", 100, 0, random.Random(0))
    with pytest.raises(ValueError, match=r"depth=120 must be a percentage"):
        probe_example("single_needle", 100, 120, random.Random(0))
    with pytest.raises(ValueError, match=r"length=5 tokens is too short .* use at least"):
        probe_example("single_needle", 5, 0, random.Random(0))
    with pytest.raises(ValueError, match=r"unknown probe task\(s\) \['x'\]"):
        write_probe_dataset(tmp_path, tasks=["x"])


def test_planted_words_are_in_the_probe_vocabulary_and_values_and_names_are_digits():
    vocabulary = set(probe_vocabulary())
    for seed in range(20):
        text, answer = probe_example("multi_key_needle", 600, 50, random.Random(seed))
        needles = re.findall(r"number for the ([a-z]+) ([a-z]+) is (\d{5}) \.", text)
        assert len(needles) == 4 and {word for color, animal, _ in needles for word in (color, animal)} <= vocabulary
        assert re.fullmatch(r"\d{5}", answer)
        text, answer = probe_example("variable_tracking", 600, 0, random.Random(seed))
        assert all(re.fullmatch(r"X\d{3}", name) for name in answer.split())
        assert len(re.findall(r"VAR X\d{3} = \d{5} \.", text)) == 2  # the chain's value and the distractor's
        _, answer = probe_example("aggregation", 600, None, random.Random(seed))
        assert answer in vocabulary
