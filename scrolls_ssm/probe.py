"""Long-range probe tasks for encoder-decoders, after RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?"): synthetic inputs of a controlled length with facts at a controlled depth.

Four tasks, each a question followed by "\\n\\n" and a document of filler sentences:

* `single_needle`: one fact "The special magic number for the <key> is <value> ." The question asks for the value.
* `multi_key_needle`: four facts of that form with different keys; the question asks for one of them.
* `variable_tracking`: a chain "VAR X417 = 48213 ." "VAR X902 = X417 ." ... of 2 to 4 hops spread from the
  depth to the end of the document, beside a distractor chain holding another value; the answer is every variable of
  the asked value's chain, in order ("X417 X902 ...").
* `aggregation`: five marked words ("The marked word is lantern .") planted 2 to 8 times each at random places; the
  answer is the most frequent one, which needs the whole input.

Values are random 5-digit numbers and variable names "X" and 3 digits; a tokenizer trained with `split_digits=True`
makes every digit a token, so both are copied digit by digit the same way wherever they stand. `probe_vocabulary()`
lists the planted words (keys and marked words), so a tokenizer trained with it in its sample keeps each one piece.
Every planted value, name and word is followed by a space (`... is 48213 .`), so it is split as the answer is.

Rows are written in the SCROLLS format (`id`, `pid`, `input`, `output`, question first) under the exact-match SCROLLS
task `quality` (`PROBE_SCROLLS_TASK`), so the loaders, the training loop and the official metric run them unchanged.
The ids carry the cell: `single_needle.L4096.D25.3` is the 4th example of 4,096 tokens with its fact at 25% depth
(`parse_probe_id`). Keys, values, variable names and marked words never occur in the filler, and values are drawn
at random, so nothing but the planted facts gives an answer away: the best constant answer scores ~0 on the
needles and variable tracking, and ~1/20 on aggregation (`probe_naive_baseline`).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from scrolls_ssm.metrics import exact_match
from scrolls_ssm.submission import write_text_atomic
from scrolls_ssm.synthetic import best_constant_prediction, filler_sentence

PROBE_TASKS = ("single_needle", "multi_key_needle", "variable_tracking", "aggregation")
# Not a probe of its own: the multi-key needle with every key asked, in a random order (the answer: their values in
# that order), after the multi-query associative recall of Arora et al. 2023 ("Zoology"). Four matches to learn
# from per example instead of one, as training rows beside the multi-key needle's.
TRAINING_TASKS = ("multi_query_needle",)
PROBE_SCROLLS_TASK = "quality"  # an exact-match SCROLLS task with the question first
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
NO_DEPTH = "all"  # aggregation's facts are everywhere; its ids carry this instead of a depth

_COLORS = "amber crimson violet indigo scarlet ivory olive teal copper silver golden azure".split()
_ANIMALS = "falcon otter badger heron lynx walrus beetle salmon gecko bison moth raven".split()
_MARKED_WORDS = (
    "lantern compass anchor hammer kettle ladder needle pulley saddle shovel "
    "trumpet violin whistle bucket candle chisel mirror ribbon spindle quill"
).split()
# Values are 5-digit numbers and variable names are "X" and 3 digits ("X417"). With a tokenizer that splits digits
# (`train_sentencepiece_tokenizer(split_digits=True)`), both are copied one digit at a time: ten output classes, each
# seen in every example, which a from-scratch model learns within minutes (docs/long_range.md). Values drawn from a
# pool of 200 one-token words were not learned in the same budget: each word is seen too rarely to be copied.
NUM_KEYS = 4  # facts in a multi-key needle document
NUM_MARKED = 5  # distinct marked words in an aggregation document

TokenCounter = Callable[[str], int]


def count_words(text: str) -> int:
    """The default token count: whitespace-separated words. Pass a tokenizer's count for exact lengths."""
    return len(text.split())


# --- the four tasks: (question, [(depth fraction, sentence), ...], answer) -----------------------------------------


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_COLORS)} {rng.choice(_ANIMALS)}"


def _value(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _needle(key: str, value: str) -> str:
    return f"The special magic number for the {key} is {value} ."


def _single_needle(rng: random.Random, depth: float) -> tuple[str, list[tuple[float, str]], str]:
    key, value = _key(rng), _value(rng)
    return f"What is the special magic number for the {key}?", [(depth, _needle(key, value))], value


def _keyed_facts(rng: random.Random, depth: float) -> tuple[list[str], list[str], list[tuple[float, str]]]:
    """`NUM_KEYS` different keys, their values, and their needles: the first at `depth`, the others anywhere."""
    keys: list[str] = []
    while len(keys) < NUM_KEYS:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    values = [_value(rng) for _ in keys]
    facts = [(depth, _needle(keys[0], values[0]))]
    facts += [(rng.random(), _needle(key, value)) for key, value in zip(keys[1:], values[1:], strict=True)]
    return keys, values, facts


def _multi_key_needle(rng: random.Random, depth: float) -> tuple[str, list[tuple[float, str]], str]:
    keys, values, facts = _keyed_facts(rng, depth)
    return f"What is the special magic number for the {keys[0]}?", facts, values[0]


def _multi_query_needle(rng: random.Random, depth: float) -> tuple[str, list[tuple[float, str]], str]:
    keys, values, facts = _keyed_facts(rng, depth)
    order = rng.sample(range(NUM_KEYS), NUM_KEYS)  # asked in an order of their own, not the document's
    asked = ", the ".join(keys[i] for i in order[:-1]) + f" and the {keys[order[-1]]}"
    return f"What are the special magic numbers for the {asked}?", facts, " ".join(values[i] for i in order)


def _variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = f"X{rng.randint(100, 999)}"
        if name not in taken:
            taken.add(name)
            return name


def _chain(rng: random.Random, value: str, hops: int, start: float, taken: set[str]) -> tuple[list[str], list]:
    """`hops` + 1 assignments: the value, then each variable copying the previous one, in document order from
    `start` to the end of the document."""
    names = [_variable_name(rng, taken) for _ in range(hops + 1)]
    depths = [start] + sorted(rng.uniform(start, 1.0) for _ in range(hops))
    sentences = [f"VAR {names[0]} = {value} ."]
    sentences += [f"VAR {name} = {previous} ." for previous, name in zip(names, names[1:], strict=False)]
    return names, list(zip(depths, sentences, strict=True))


def _variable_tracking(rng: random.Random, depth: float) -> tuple[str, list[tuple[float, str]], str]:
    value, distractor = _value(rng), _value(rng)
    while distractor == value:
        distractor = _value(rng)
    taken: set[str] = set()
    hops = rng.randint(2, 4)
    names, facts = _chain(rng, value, hops, depth, taken)
    _, distractor_facts = _chain(rng, distractor, hops, rng.random(), taken)
    return f"Which variables are assigned the value {value}?", facts + distractor_facts, " ".join(names)


def _aggregation(rng: random.Random, depth: float | None) -> tuple[str, list[tuple[float, str]], str]:
    words = rng.sample(_MARKED_WORDS, NUM_MARKED)
    counts = rng.sample(range(2, 9), NUM_MARKED)  # distinct, so the most frequent word is unique
    facts = [
        (rng.random(), f"The marked word is {word} .")
        for word, count in zip(words, counts, strict=True)
        for _ in range(count)
    ]
    return "Which marked word appears most often?", facts, words[counts.index(max(counts))]


_BUILDERS = {
    "single_needle": _single_needle,
    "multi_key_needle": _multi_key_needle,
    "multi_query_needle": _multi_query_needle,
    "variable_tracking": _variable_tracking,
    "aggregation": _aggregation,
}


def probe_example(
    task: str, length: int, depth: int | None, rng: random.Random, count_tokens: TokenCounter = count_words
) -> tuple[str, str]:
    """`(input, answer)` of one probe example of about `length` tokens (as `count_tokens` counts them; never more,
    and less by at most one filler sentence) with its fact at `depth` percent of the document (None: aggregation, or
    a random depth)."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown probe task {task!r}; valid tasks: {', '.join(PROBE_TASKS + TRAINING_TASKS)}.")
    if depth is not None and not 0 <= depth <= 100:
        raise ValueError(f"depth={depth} must be a percentage in [0, 100].")
    fraction = rng.random() if depth is None else depth / 100
    question, facts, answer = _BUILDERS[task](rng, fraction)
    header = f"{question}\n\n"
    budget = length - count_tokens(header) - sum(count_tokens(sentence) for _, sentence in facts)
    if budget < 0:
        raise ValueError(f"length={length} tokens is too short for a {task} example; use at least {length - budget}.")
    filler: list[str] = []
    while True:
        sentence = filler_sentence(rng)
        cost = count_tokens(sentence)
        if cost > budget:
            break
        filler.append(sentence)
        budget -= cost
    # Each fact goes before the filler sentence at its depth; facts at one boundary keep their given order.
    placed = sorted(
        ((round(fraction_ * len(filler)), order, sentence) for order, (fraction_, sentence) in enumerate(facts)),
    )
    document: list[str] = []
    next_fact = 0
    for index in range(len(filler) + 1):
        while next_fact < len(placed) and placed[next_fact][0] == index:
            document.append(placed[next_fact][2])
            next_fact += 1
        if index < len(filler):
            document.append(filler[index])
    return header + " ".join(document), answer


def probe_vocabulary() -> list[str]:
    """Every word the tasks plant (keys and marked words): add it to a tokenizer's training sample a few
    times so each stays one piece, as `benchmarks/long_range_probe.py` does."""
    return [*_COLORS, *_ANIMALS, *_MARKED_WORDS]


# --- datasets --------------------------------------------------------------------------------------------------------


def probe_id(task: str, length: int, depth: int | None, index: int) -> str:
    return f"{task}.L{length}.D{NO_DEPTH if depth is None else depth}.{index}"


def parse_probe_id(id_: str) -> tuple[str, int, int | None]:
    """`(task, length, depth)` of a probe row id (depth None for aggregation)."""
    task, length, depth, _ = id_.split(".")
    return task, int(length[1:]), None if depth[1:] == NO_DEPTH else int(depth[1:])


def probe_rows(
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[int | None],
    per_cell: int,
    seed: int,
    split: str,
    count_tokens: TokenCounter = count_words,
) -> Iterable[dict]:
    """`per_cell` rows for every (task, length, depth) cell; aggregation has one cell per length. A depth of None
    draws a random depth per row (training data); such rows carry `Dall` in their id."""
    for task in tasks:
        for length in lengths:
            for depth in [None] if task == "aggregation" else depths:
                for index in range(per_cell):
                    rng = random.Random(f"{seed}/{split}/{task}/{length}/{depth}/{index}")
                    text, answer = probe_example(task, length, depth, rng, count_tokens)
                    id_ = probe_id(task, length, depth, index)
                    yield {"id": id_, "pid": f"{id_}_0", "input": text, "output": answer}


def write_probe_dataset(
    out_dir: str | os.PathLike[str],
    tasks: Sequence[str] = PROBE_TASKS,
    train_lengths: Sequence[int] = (1024,),
    num_train_per_length: int = 200,
    eval_lengths: Sequence[int] = (1024, 4096, 16384),
    depths: Sequence[int] = DEFAULT_DEPTHS,
    num_eval_per_cell: int = 4,
    seed: int = 0,
    count_tokens: TokenCounter = count_words,
    training_tasks: Sequence[str] = (),
) -> Path:
    """Write `<out_dir>/quality/{train,validation}.jsonl`: training rows at random depths for every task and training
    length, and held-out rows for every (task, eval length, depth) cell. `training_tasks` (of `TRAINING_TASKS`) add
    training rows only, `num_train_per_length` per length each. Returns `out_dir`."""
    unknown = sorted(set(tasks) - set(PROBE_TASKS))
    if unknown:
        raise ValueError(f"unknown probe task(s) {unknown}; valid tasks: {', '.join(PROBE_TASKS)}.")
    unknown = sorted(set(training_tasks) - set(TRAINING_TASKS))
    if unknown:
        raise ValueError(f"unknown training task(s) {unknown}; valid training tasks: {', '.join(TRAINING_TASKS)}.")
    folder = Path(out_dir) / PROBE_SCROLLS_TASK
    train_tasks = [*tasks, *training_tasks]
    train = list(probe_rows(train_tasks, train_lengths, [None], num_train_per_length, seed, "train", count_tokens))
    random.Random(seed).shuffle(train)  # lengths and tasks interleaved, so any prefix is a fair sample
    validation = probe_rows(tasks, eval_lengths, depths, num_eval_per_cell, seed, "validation", count_tokens)
    for split, rows in (("train", train), ("validation", validation)):
        write_text_atomic(folder / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return Path(out_dir)


# --- scores ----------------------------------------------------------------------------------------------------------


def probe_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[tuple[str, int, int | None], float]:
    """Exact match (the official SCROLLS normalization), in percent, of every (task, length, depth) cell."""
    cells: dict[tuple[str, int, int | None], list[float]] = defaultdict(list)
    for id_, answers in references.items():
        if id_ not in predictions:
            raise ValueError(f"no prediction for probe row {id_!r}; predict every validation row.")
        cells[parse_probe_id(id_)].append(max(exact_match(predictions[id_], answer) for answer in answers))
    return {cell: 100.0 * sum(hits) / len(hits) for cell, hits in sorted(cells.items(), key=lambda kv: str(kv[0]))}


def probe_naive_baseline(
    train_rows: Iterable[Mapping[str, str]], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Exact match, in percent per task, of predicting each task's best constant training answer for every row."""
    outputs: dict[str, list[str]] = defaultdict(list)
    for row in train_rows:
        outputs[parse_probe_id(row["id"])[0]].append(row["output"])
    constants = {task: best_constant_prediction(PROBE_SCROLLS_TASK, answers) for task, answers in outputs.items()}
    hits: dict[str, list[float]] = defaultdict(list)
    for id_, answers in references.items():
        task = parse_probe_id(id_)[0]
        hits[task].append(max(exact_match(constants.get(task, ""), answer) for answer in answers))
    return {task: 100.0 * sum(values) / len(values) for task, values in hits.items()}
