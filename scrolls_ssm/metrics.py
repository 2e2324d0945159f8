"""SCROLLS scoring, equivalent to the benchmark's official metric to 4 decimals.

The rules (see docs/data_and_metrics.md) are those of the official `metrics/scrolls.py`:

* ROUGE (gov_report, summ_screen_fd, qmsum): `rouge_score` F-measure x 100 without stemming; with several
  references the max is taken per ROUGE key independently; corpus value = mean over ids; the task score is the
  geometric mean of the corpus R1, R2 and RL.
* F1 / exact match (qasper, narrative_qa / quality, contract_nli): SQuAD-v1 normalization, max over an id's
  references, mean over ids, x 100.
* Every number is rounded with round(x, 4) after the geometric mean is taken.

One deliberate difference: the official code splits sentences with nltk's punkt model before ROUGE. That only
changes `rouge/rougeLsum` (rouge_score's tokenizer treats newlines as spaces for the other keys), which is
reported but not scored. punkt needs a download, so `split_sentences` below uses a small rule instead; rougeLsum
may differ from the official value in the last digits, nothing else does.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

from rouge_score import rouge_scorer

from scrolls_ssm.data import SCORED_TASKS, TASKS, get_task

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket) and white space, except after
# the common titles punkt also knows ("Dr. Smith" stays one sentence).
_SENTENCE_END = re.compile(
    r"(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMrs\.)(?<!\bvs\.)"
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+"
)


def normalize_answer(text: str) -> str:
    """SQuAD-v1 normalization, in the official order: lowercase, delete punctuation, articles -> space, collapse.

    Punctuation is deleted, not replaced by a space ("1,000" -> "1000", "well-known" -> "wellknown").
    """
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 in [0, 1] after normalization; no overlap (including empty vs empty) gives 0."""
    prediction_tokens = normalize_answer(prediction).split()
    reference_tokens = normalize_answer(reference).split()
    overlap = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if prediction and reference are equal after normalization, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def split_sentences(text: str) -> str:
    """Put each sentence on its own line, as rougeLsum expects (stands in for nltk.sent_tokenize)."""
    lines = (line.strip() for line in text.strip().splitlines())
    return "\n".join(sentence for line in lines if line for sentence in _SENTENCE_END.split(line) if sentence)


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)


def rouge_max_over_references(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE F-measure x 100 for each key, each maximised over the references independently."""
    scorer = _rouge_scorer()
    prediction = split_sentences(prediction)
    best = dict.fromkeys(ROUGE_KEYS, 0.0)
    for reference in references:
        scores = scorer.score(split_sentences(reference), prediction)
        for key in ROUGE_KEYS:
            best[key] = max(best[key], scores[key].fmeasure * 100)
    return best


def _rouge_pair(pair: tuple[str, Sequence[str]]) -> dict[str, float]:
    return rouge_max_over_references(*pair)


def _aligned(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    """The ids to score, after checking both sides name exactly the same ids and every id has a reference."""

    def listing(ids: list[str]) -> str:
        shown = ", ".join(repr(i) for i in ids[:10])
        return f"{len(ids)} id(s): {shown}" + (", ..." if len(ids) > 10 else "")

    missing = [id_ for id_ in references if id_ not in predictions]
    extra = [id_ for id_ in predictions if id_ not in references]
    problems = []
    if missing:
        problems.append(f"no prediction for {listing(missing)}")
    if extra:
        problems.append(f"predictions for ids not in the references, {listing(extra)}")
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Fix: predict exactly once for every id of the split you score against."
        )
    if not references:
        raise ValueError("no ids to score: the references are empty.")
    unreferenced = [id_ for id_, refs in references.items() if len(refs) == 0]
    if unreferenced:
        raise ValueError(
            f"{listing(unreferenced)} have no reference output (test-split data?). Fix: score against the "
            f"train or validation split; test outputs are hidden."
        )
    not_strings = [id_ for id_, prediction in predictions.items() if not isinstance(prediction, str)]
    if not_strings:
        raise ValueError(f"predictions must be strings; not so for {listing(not_strings)}.")
    return list(references)


def compute_scrolls_metrics(
    task: str,
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    num_proc: int | None = None,
) -> dict[str, float | int | None]:
    """Score predictions `{id: text}` against references `{id: [text, ...]}` exactly as the official metric.

    Returns the official keys: the metric's own (`rouge/...`, `f1` or `exact_match`), `num_predicted`,
    `mean_prediction_length_characters` and `scrolls_score` (None for quality_hard). num_proc > 1 spreads
    ROUGE over processes (the official code uses a Pool too: ROUGE-L on GovReport is quadratic per summary).
    """
    spec = get_task(task)
    ids = _aligned(predictions, references)
    metrics: dict[str, float] = {}
    if spec.metric == "rouge":
        pairs = [(predictions[id_], references[id_]) for id_ in ids]
        if num_proc is not None and num_proc > 1 and len(pairs) > 1:
            with ProcessPoolExecutor(max_workers=num_proc) as pool:
                per_id = list(pool.map(_rouge_pair, pairs, chunksize=max(1, len(pairs) // (4 * num_proc))))
        else:
            per_id = [_rouge_pair(pair) for pair in pairs]
        for key in ROUGE_KEYS:
            metrics[f"rouge/{key}"] = sum(scores[key] for scores in per_id) / len(per_id)
        metrics["rouge/geometric_mean"] = math.pow(
            metrics["rouge/rouge1"] * metrics["rouge/rouge2"] * metrics["rouge/rougeL"], 1.0 / 3.0
        )
        score_key = "rouge/geometric_mean"
    else:
        pair_score = token_f1 if spec.metric == "f1" else exact_match
        total = sum(max(pair_score(predictions[id_], ref) for ref in references[id_]) for id_ in ids)
        metrics[spec.metric] = 100.0 * total / len(ids)
        score_key = spec.metric
    metrics["num_predicted"] = len(ids)
    metrics["mean_prediction_length_characters"] = sum(len(predictions[id_]) for id_ in ids) / len(ids)
    result: dict[str, float | int | None] = {key: round(value, 4) for key, value in metrics.items()}
    result["scrolls_score"] = result[score_key] if spec.in_scrolls_score else None
    return result


def scrolls_score(task_scores: Mapping[str, float]) -> float:
    """The SCROLLS score: the plain mean of the seven task scores (QuALITY by its full-set EM).

    quality_hard may be present (it is reported beside the score) and is ignored; any other unknown task or a
    missing one is an error, since a mean over fewer tasks is not comparable to the leaderboard.
    """
    unknown = sorted(set(task_scores) - set(TASKS))
    missing = [task for task in SCORED_TASKS if task not in task_scores]
    if unknown or missing:
        raise ValueError(
            f"scrolls_score needs exactly the tasks {', '.join(SCORED_TASKS)}; "
            + "; ".join(
                part
                for part in (f"unknown: {unknown}" if unknown else "", f"missing: {missing}" if missing else "")
                if part
            )
        )
    values = [task_scores[task] for task in SCORED_TASKS]
    if any(not isinstance(value, int | float) for value in values):
        raise ValueError(f"task scores must be numbers, got {dict(zip(SCORED_TASKS, values, strict=True))}")
    return sum(values) / len(values)
