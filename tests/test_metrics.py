"""Hand-computed checks of every scoring rule in shared/scrolls.md."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import pytest

import scrolls_ssm.metrics
from scrolls_ssm.metrics import (
    compute_scrolls_metrics,
    exact_match,
    normalize_answer,
    rouge_max_over_references,
    scrolls_score,
    split_sentences,
    token_f1,
)

# The example in the official metric's docstring, with the values it documents.
OFFICIAL_PREDICTIONS = {"0": "exact match example", "1": "hello there", "2": "general kenobi"}
OFFICIAL_REFERENCES = {"0": ["exact match example"], "1": ["hello", "hi there"], "2": ["commander kenobi"]}


def test_official_docstring_example_summarization():
    assert compute_scrolls_metrics("gov_report", OFFICIAL_PREDICTIONS, OFFICIAL_REFERENCES) == {
        "rouge/rouge1": 72.2222,
        "rouge/rouge2": 33.3333,
        "rouge/rougeL": 72.2222,
        "rouge/rougeLsum": 72.2222,
        "rouge/geometric_mean": 55.8136,
        "num_predicted": 3,
        "mean_prediction_length_characters": 14.6667,
        "scrolls_score": 55.8136,
    }


@pytest.mark.parametrize(
    ("task", "key", "value"), [("contract_nli", "exact_match", 33.3333), ("narrative_qa", "f1", 72.2222)]
)
def test_official_docstring_example_qa(task, key, value):
    result = compute_scrolls_metrics(task, OFFICIAL_PREDICTIONS, OFFICIAL_REFERENCES)
    assert result == {
        key: value,
        "num_predicted": 3,
        "mean_prediction_length_characters": 14.6667,
        "scrolls_score": value,
    }


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("1,000", "1000"),  # punctuation deleted, not spaced
        ("well-known", "wellknown"),
        ("The cat and a dog", "cat and dog"),
        ("An apple, the end.", "apple end"),
        ("the-end", "theend"),  # punctuation goes first, so no article is left to remove
        ("  Many \n\t spaces  ", "many spaces"),
        ("Café", "café"),  # no unicode folding
        ("theory", "theory"),  # \b keeps words that start with an article
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_token_f1_hand_values():
    # pred -> [cat, sat, on, mat], ref -> [cat, sat]: overlap 2, P 1/2, R 1, F1 2/3.
    assert token_f1("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    # Counts are clipped: pred [a_word x3] vs ref [a_word x1] -> overlap 1, P 1/3, R 1, F1 1/2.
    assert token_f1("yes yes yes", "yes") == pytest.approx(0.5)
    assert token_f1("", "") == 0.0
    assert token_f1("", "something") == 0.0
    assert token_f1("1,000 people", "1000 people") == 1.0


def test_f1_max_over_references_then_mean_over_ids():
    predictions = {"x": "blue", "y": "", "z": "the red car"}
    references = {"x": ["red", "blue sky"], "y": ["anything"], "z": ["a red car", "car"]}
    # x: max(0, F1(blue | blue sky) = 2/3); y: empty -> 0; z: max(1, F1(red car | car) = 2/3) = 1.
    result = compute_scrolls_metrics("qasper", predictions, references)
    assert result["f1"] == round(100 * (2 / 3 + 0 + 1) / 3, 4) == 55.5556
    assert result["num_predicted"] == 3
    assert result["mean_prediction_length_characters"] == round((4 + 0 + 11) / 3, 4) == 5.0


def test_exact_match_quality_option_text_and_contract_nli_labels():
    # QuALITY references are the option text: the letter does not match, the text does (case/punct aside).
    quality = compute_scrolls_metrics(
        "quality",
        {"q1": "The hotel manager.", "q2": "B"},
        {"q1": ["the hotel manager"], "q2": ["A lighthouse keeper"]},
    )
    assert quality["exact_match"] == 50.0
    assert quality["scrolls_score"] == 50.0
    nli = compute_scrolls_metrics(
        "contract_nli",
        {"c1": "Not mentioned", "c2": "Entailment", "c3": "contradiction", "c4": ""},
        {"c1": ["Not mentioned"], "c2": ["Contradiction"], "c3": ["Contradiction"], "c4": ["Entailment"]},
    )
    assert nli["exact_match"] == 50.0
    assert exact_match("Not mentioned.", "not  mentioned") == 1.0


def test_quality_hard_is_reported_not_scored():
    result = compute_scrolls_metrics("quality_hard", {"q": "x"}, {"q": ["x"]})
    assert result["exact_match"] == 100.0
    assert result["scrolls_score"] is None


def test_rouge_max_is_taken_per_key_independently():
    prediction = "alpha beta gamma delta"
    # ref_a: same words, shuffled -> R1 100, R2 0 (no shared bigram), RL = LCS 3 of 4 -> 75.
    # ref_b: "alpha beta" + 4 others -> R1 F(2/4, 2/6) = 40, R2 F(1/3, 1/5) = 25, RL 40.
    ref_a, ref_b = "alpha gamma beta delta", "alpha beta zeta zeta zeta zeta"
    best = rouge_max_over_references(prediction, [ref_a, ref_b])
    assert best["rouge1"] == pytest.approx(100.0)
    assert best["rouge2"] == pytest.approx(25.0)
    assert best["rougeL"] == pytest.approx(75.0)
    result = compute_scrolls_metrics("qmsum", {"d": prediction}, {"d": [ref_a, ref_b]})
    # Using one "best" reference for all keys would give R2 = 0 or R1 = 40; per-key max gives:
    assert result["rouge/geometric_mean"] == round((100 * 25 * 75) ** (1 / 3), 4) == 57.2357


def test_geometric_mean_is_of_corpus_means_not_mean_of_per_id_geometric_means():
    predictions = {"a": "alpha beta gamma delta", "b": "alpha beta"}
    references = {"a": ["alpha gamma beta delta"], "b": ["alpha beta"]}
    result = compute_scrolls_metrics("gov_report", predictions, references)
    # id a: R1 100, R2 0, RL 75 (its own geometric mean is 0); id b: all 100.
    assert (result["rouge/rouge1"], result["rouge/rouge2"], result["rouge/rougeL"]) == (100.0, 50.0, 87.5)
    assert result["rouge/geometric_mean"] == round((100 * 50 * 87.5) ** (1 / 3), 4) == 75.9147
    assert result["scrolls_score"] == 75.9147  # the mean of per-id geometric means would be 50


def test_rouge_is_case_and_punctuation_blind_and_unstemmed():
    result = compute_scrolls_metrics("gov_report", {"a": "THE CATS, ran!"}, {"a": ["the cat ran"]})
    # rouge_score lowercases and drops punctuation but does not stem: cats != cat -> R1 F(2/3, 2/3).
    assert result["rouge/rouge1"] == round(100 * 2 / 3, 4) == 66.6667


def test_empty_predictions_score_zero():
    rouge = compute_scrolls_metrics("summ_screen_fd", {"a": "", "b": ""}, {"a": ["some text"], "b": ["x y"]})
    assert rouge["rouge/rouge1"] == rouge["rouge/geometric_mean"] == 0.0
    assert rouge["mean_prediction_length_characters"] == 0.0
    assert compute_scrolls_metrics("narrative_qa", {"a": ""}, {"a": ["", "text"]})["f1"] == 0.0


def test_rouge_lsum_uses_sentence_lines():
    prediction, reference = "Gamma delta. Alpha beta.", "Alpha beta. Gamma delta."
    result = compute_scrolls_metrics("gov_report", {"a": prediction}, {"a": [reference]})
    # Whole-text LCS keeps 2 of 4 tokens; summary-level LCS covers each reference sentence fully.
    assert result["rouge/rougeL"] == 50.0
    assert result["rouge/rougeLsum"] == 100.0


def test_split_sentences():
    text = 'He left. "Stay," she said. Dr. Smith came!  Why? Done\nNew line (yes.) End'
    assert split_sentences(text).split("\n") == [
        "He left.",
        '"Stay," she said.',
        "Dr. Smith came!",
        "Why?",
        "Done",
        "New line (yes.)",
        "End",
    ]


def test_rounding_to_four_decimals():
    result = compute_scrolls_metrics("qasper", {"a": "x", "b": "y", "c": "zz"}, {"a": ["x"], "b": ["q"], "c": ["q"]})
    assert result["f1"] == 33.3333
    assert result["mean_prediction_length_characters"] == 1.3333


def test_rouge_in_processes_matches_serial():
    predictions = {str(i): f"alpha beta gamma {i}" for i in range(6)}
    references = {str(i): [f"alpha gamma {i} delta", "beta"] for i in range(6)}
    serial = compute_scrolls_metrics("gov_report", predictions, references)
    assert compute_scrolls_metrics("gov_report", predictions, references, num_proc=2) == serial


def test_missing_and_extra_ids_are_listed():
    references = {f"id{i}": ["x"] for i in range(12)}
    predictions = {"id0": "x", "zz": "y"}
    with pytest.raises(ValueError) as error:
        compute_scrolls_metrics("qasper", predictions, references)
    message = str(error.value)
    assert "no prediction for 11 id(s): 'id1', 'id2'" in message
    assert "'id10', ..." in message and "'id11'" not in message  # first 10 shown
    assert "ids not in the references, 1 id(s): 'zz'" in message


def test_ids_without_references_are_rejected():
    with pytest.raises(ValueError, match="have no reference output"):
        compute_scrolls_metrics("qasper", {"a": "x"}, {"a": []})


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown SCROLLS task 'govreport'; valid tasks: gov_report"):
        compute_scrolls_metrics("govreport", {"a": "x"}, {"a": ["x"]})


def test_scrolls_score_is_plain_mean_of_seven():
    scores = {
        "gov_report": 10.0,
        "summ_screen_fd": 20.0,
        "qmsum": 30.0,
        "qasper": 40.0,
        "narrative_qa": 50.0,
        "quality": 60.0,
        "contract_nli": 70.0,
    }
    assert scrolls_score(scores) == 40.0
    assert scrolls_score({**scores, "quality_hard": 0.0}) == 40.0
    without_qmsum = {task: value for task, value in scores.items() if task != "qmsum"}
    with pytest.raises(ValueError, match=r"missing: \['qmsum'\]"):
        scrolls_score(without_qmsum)
    with pytest.raises(ValueError, match=r"unknown: \['hotpot'\]"):
        scrolls_score({**scores, "hotpot": 1.0})


@pytest.mark.parametrize(
    ("rouge_rows", "qasper", "narrative_qa", "quality", "contract_nli", "published"),
    [
        ([(47.9, 18.6, 22.7), (27.2, 4.9, 16.7), (30.2, 8.7, 20.7)], 26.3, 15.4, 26.0, 77.4, 29.01),  # BART-base
        ([(56.2, 26.6, 28.8), (24.2, 4.5, 15.4), (25.1, 6.7, 18.8)], 26.6, 18.5, 25.8, 71.5, 29.16),  # LED-base
        ([(61.3, 32.2, 33.8), (36.4, 10.2, 21.7), (36.2, 12.9, 24.3)], 53.9, 31.1, 48.1, 88.4, 43.51),  # CoLT5-XL
    ],
)
def test_published_scores_from_their_task_scores(rouge_rows, qasper, narrative_qa, quality, contract_nli, published):
    # The paper's task scores are printed to one decimal, so the recomputed mean can be off by a few hundredths.
    rouge_tasks = ("gov_report", "summ_screen_fd", "qmsum")
    scores = {task: math.pow(r1 * r2 * rl, 1 / 3) for task, (r1, r2, rl) in zip(rouge_tasks, rouge_rows, strict=True)}
    scores.update(qasper=qasper, narrative_qa=narrative_qa, quality=quality, contract_nli=contract_nli)
    assert scrolls_score(scores) == pytest.approx(published, abs=0.03)


def test_evaluate_module_loads_offline_and_matches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    module_dir = Path(scrolls_ssm.metrics.__file__).parent / "scrolls_metric"
    metric = evaluate.load(str(module_dir), "gov_report")
    result = metric.compute(
        predictions=list(OFFICIAL_PREDICTIONS.values()), references=list(OFFICIAL_REFERENCES.values())
    )
    assert result == compute_scrolls_metrics("gov_report", OFFICIAL_PREDICTIONS, OFFICIAL_REFERENCES)
    assert result["rouge/geometric_mean"] == 55.8136
    with pytest.raises(ValueError, match="unknown SCROLLS task 'govreport' as config name"):
        evaluate.load(str(module_dir), "govreport")
