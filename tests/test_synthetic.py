"""The synthetic demo data: SCROLLS format, determinism, recoverable long-range answers, baselines, tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from scrolls_ssm.data import group_references, load_scrolls
from scrolls_ssm.metrics import compute_scrolls_metrics
from scrolls_ssm.synthetic import (
    NLI_LABELS,
    SYNTHETIC_TASKS,
    best_constant_prediction,
    naive_baseline,
    train_sentencepiece_tokenizer,
    write_synthetic_scrolls,
)

SIZES = dict(num_train=24, num_validation=12, num_test=3, doc_words=300, num_distractors=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_scrolls(tmp_path_factory.mktemp("synthetic"), **SIZES)


def _load(data_dir, task, split, tmp_path):
    return load_scrolls(task, split, data_files=data_dir, cache_dir=tmp_path / "cache")


def _oracle(task: str, text: str) -> str:
    """Recover the planted answer with regular expressions, as a perfect long-range reader would."""
    query, _, document = text.partition("\n\n")
    if task == "gov_report":
        agency = re.search(r"prepared by the ([^.]+)\.", text).group(1)
        topic = re.match(r"A review of ([^.]+)\.", text).group(1)
        finding = re.search(r"In conclusion, the review finds that ([^.]+)\.", text).group(1)
        return f"The {agency} report on {topic} finds that {finding}."
    if task == "qasper":
        entity = re.fullmatch(r"What is the code name of the (\w+) project\?", query).group(1)
        return re.search(rf"The {entity} project carries the code name (\w+)\.", document).group(1)
    action = re.fullmatch(r"The Receiving Party is allowed to ([^.]+)\.", query).group(1)
    clause = re.search(rf"The Receiving Party (may|shall not) {re.escape(action)}\.", document)
    if clause is None:
        return "Not mentioned"
    return "Entailment" if clause.group(1) == "may" else "Contradiction"


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_files_load_as_scrolls(data_dir, task, tmp_path):
    for split, size in (("train", 24), ("validation", 12), ("test", 3)):
        rows = _load(data_dir, task, split, tmp_path)
        assert rows.column_names == ["id", "pid", "input", "output"]
        assert len(rows) == size == len(set(rows["id"]))
        assert all(output is None for output in rows["output"]) == (split == "test")
    if task != "gov_report":  # query-first inputs, as in SCROLLS
        assert all("\n\n" in text for text in rows["input"])


def test_deterministic_for_a_seed(tmp_path):
    def contents(seed, num_train=4):
        out = write_synthetic_scrolls(tmp_path / f"{seed}-{num_train}", num_train, 2, 1, doc_words=150, seed=seed)
        return {str(path.relative_to(out)): path.read_text() for path in sorted(out.rglob("*.jsonl"))}

    first = contents(7)
    assert len(first) == 9
    assert first == contents(7)
    assert first["qasper/validation.jsonl"] != contents(8)["qasper/validation.jsonl"]
    # Each split has its own generator: more training rows leave validation and test unchanged.
    more = contents(7, num_train=6)
    assert more["qasper/train.jsonl"].startswith(first["qasper/train.jsonl"])
    assert all(more[name] == text for name, text in first.items() if "train" not in name)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_regex_oracle_scores_100(data_dir, task, tmp_path):
    rows, references = group_references(_load(data_dir, task, "validation", tmp_path))
    predictions = {id_: _oracle(task, text) for id_, text in zip(rows["id"], rows["input"], strict=True)}
    assert compute_scrolls_metrics(task, predictions, references)["scrolls_score"] == 100.0


@pytest.mark.parametrize("task", ["qasper", "contract_nli"])
def test_answers_sit_far_from_the_query_among_distractors(data_dir, task, tmp_path):
    rows = _load(data_dir, task, "train", tmp_path)
    fact = (
        r"project carries the code name"
        if task == "qasper"
        else r"The Receiving Party (?:may|shall not|[a-z ]+? whether)"
    )
    for text in rows["input"]:
        document = text.partition("\n\n")[2]
        starts = [match.start() for match in re.finditer(fact, document)]
        assert len(starts) == 1 + SIZES["num_distractors"]
        # Facts are planted after the first quarter of the sentences (words and characters agree to within noise).
        assert min(starts) > 0.2 * len(document)


def test_gov_report_facts_are_sections_apart(data_dir, tmp_path):
    for text in _load(data_dir, "gov_report", "train", tmp_path)["input"]:
        agency = text.index("This report was prepared by")
        finding = text.index("In conclusion, the review finds")
        assert agency < text.index("Section 2.") < text.index("Section 5.") < finding
        assert text.count("had found that") == SIZES["num_distractors"]


def test_labels_are_balanced(data_dir, tmp_path):
    for split in ("train", "validation"):
        counts = Counter(_load(data_dir, "contract_nli", split, tmp_path)["output"])
        assert set(counts) == set(NLI_LABELS)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_baseline_by_hand():
    references = {"a": ["Heron"], "b": ["Lynx"], "c": ["Heron"], "d": ["Yak"]}
    train = [{"output": answer} for answer in ("Lynx", "Heron", "Heron", "Yak")]
    assert naive_baseline("qasper", train, references)["f1"] == 50.0
    assert (
        best_constant_prediction("contract_nli", ["Entailment", "Not mentioned", "Not mentioned"]) == "Not mentioned"
    )
    # ROUGE: "a b c" overlaps "a b d" and itself, so it beats the more frequent "x y z" as a constant prediction.
    summaries = ["x y z", "x y z", "a b c", "a b d", "a b e"]
    assert best_constant_prediction("gov_report", summaries) == "a b c"
    metrics = naive_baseline("gov_report", [{"output": s} for s in summaries], {"r1": ["a b c"], "r2": ["x y z"]})
    assert metrics["rouge/rouge1"] == metrics["rouge/rouge2"] == metrics["rouge/geometric_mean"] == 50.0
    with pytest.raises(ValueError, match="at least one"):
        naive_baseline("qasper", [{"output": None}], references)


def test_baselines_are_low_on_the_demo_data(data_dir, tmp_path):
    train = _load(data_dir, "contract_nli", "train", tmp_path)
    _, references = group_references(_load(data_dir, "contract_nli", "validation", tmp_path))
    assert naive_baseline("contract_nli", train, references)["exact_match"] == pytest.approx(100 / 3, abs=0.01)


def test_short_training_documents_leave_evaluation_alone(tmp_path):
    def words(out, split):
        rows = _load(out, "qasper", split, tmp_path)
        return [len(text.split()) for text in rows["input"]]

    plain = write_synthetic_scrolls(tmp_path / "plain", 20, 4, 1, doc_words=400, tasks=["qasper"])
    mixed = write_synthetic_scrolls(
        tmp_path / "mixed", 20, 4, 1, doc_words=400, min_train_doc_words=60, tasks=["qasper"]
    )
    assert min(words(plain, "train")) > 300 and min(words(mixed, "train")) < 200
    assert max(words(mixed, "train")) <= 1.2 * 400 + 60  # the question, the facts and the last sentence add some
    assert (plain / "qasper" / "validation.jsonl").read_text() == (mixed / "qasper" / "validation.jsonl").read_text()


def test_train_short_evaluate_long_and_facts_planted_late(tmp_path):
    """max_train_doc_words caps the training documents only; plant_after keeps every queried fact past that fraction
    of its document (the gov_report finding: of its last section)."""
    out = write_synthetic_scrolls(
        tmp_path / "late", 30, 6, 1, doc_words=600, min_train_doc_words=60, max_train_doc_words=120, plant_after=0.6
    )
    train_words = [len(text.split()) for text in _load(out, "qasper", "train", tmp_path)["input"]]
    assert max(train_words) <= 120 + 40 and min(train_words) >= 60  # the question and the facts add some
    assert min(len(text.split()) for text in _load(out, "qasper", "validation", tmp_path)["input"]) >= 480

    def first_fact_after_the_first_60_percent(text: str, fact: str) -> bool:
        """Whether the first sentence holding `fact` comes after the first int(0.6 n) of the n filler sentences."""
        lines = [re.sub(r"^\d+\. ", "", line) for line in text.split("\n") if line.endswith(".")]  # no headers
        sentences = [sentence for line in lines for sentence in re.split(r"(?<=\.) ", line)]
        facts = [index for index, sentence in enumerate(sentences) if fact in sentence]
        return facts[0] >= int(0.6 * (len(sentences) - len(facts)))

    for split in ("train", "validation"):
        for row in _load(out, "qasper", split, tmp_path):
            assert first_fact_after_the_first_60_percent(row["input"].split("\n\n", 1)[1], "carries the code name")
        for row in _load(out, "contract_nli", split, tmp_path):
            assert first_fact_after_the_first_60_percent(row["input"].split("\n\n", 1)[1], "The Receiving Party")
        for row in _load(out, "gov_report", split, tmp_path):
            assert first_fact_after_the_first_60_percent(row["input"].rsplit("Section 5.", 1)[1], "In conclusion")
    with pytest.raises(ValueError, match="plant_after=1"):
        write_synthetic_scrolls(tmp_path / "bad", plant_after=1)
    with pytest.raises(ValueError, match="max_train_doc_words=20"):
        write_synthetic_scrolls(tmp_path / "bad", max_train_doc_words=20)


def test_mentions_restate_each_fact_far_from_the_query(tmp_path):
    out = write_synthetic_scrolls(tmp_path / "m", 9, 3, 1, doc_words=400, num_distractors=1, mentions=3)
    for row in _load(out, "qasper", "train", tmp_path):
        question, document = row["input"].split("\n\n", 1)
        entity = re.search(r"of the (.+) project\?", question).group(1)
        facts = [
            m.start() for m in re.finditer(rf"The {entity} project carries the code name {row['output']}\.", document)
        ]
        assert len(facts) == 3 and min(facts) > len(document) // 5
        assert len(re.findall(r"carries the code name", document)) == 6  # the distractor project too
    for row in _load(out, "contract_nli", "train", tmp_path):
        hypothesis, contract = row["input"].split("\n\n", 1)
        statements = re.findall(r"The Receiving Party (?:may|shall not|[a-z ]+ whether [a-z ]+) [^.]+\.", contract)
        assert len(statements) == 6 and all(statements.count(statement) == 3 for statement in statements)
        # Every label speaks of the hypothesis' action; "Not mentioned" in words that neither permit nor forbid.
        action = hypothesis.removeprefix("The Receiving Party is allowed to ")
        about = {statement for statement in statements if statement.endswith(action)}
        assert len(about) == 1 and (" whether " in about.pop()) == (row["output"] == "Not mentioned")
    for row in _load(out, "gov_report", "train", tmp_path):
        agency = re.match(r"The (.+) report on", row["output"]).group(1)
        assert row["input"].count(agency) == 3  # "prepared by the ..." + two "The ... reviewed this section."
        finding = row["output"].split(" finds that ")[1]
        assert row["input"].count(f"In conclusion, the review finds that {finding}") == 3


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="narrative_qa"):
        write_synthetic_scrolls(tmp_path, tasks=["narrative_qa"])
    with pytest.raises(ValueError, match="num_distractors"):
        write_synthetic_scrolls(tmp_path, num_distractors=99)
    with pytest.raises(ValueError, match="at least 50 words"):
        write_synthetic_scrolls(tmp_path, min_train_doc_words=10)
    with pytest.raises(ValueError, match="mentions=0"):
        write_synthetic_scrolls(tmp_path, mentions=0)


def test_tokenizer_round_trip(data_dir, tmp_path):
    rows = _load(data_dir, "qasper", "train", tmp_path)
    texts = [*rows["input"], *rows["output"]]
    tokenizer = train_sentencepiece_tokenizer(texts, tmp_path / "spm", vocab_size=800)
    special = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    text = rows["input"][0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    assert len(ids) < 1.5 * len(text.split())  # the vocabulary covers the words nearly whole
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # newlines and "\n\n" survive
    target = tokenizer(text_target=rows["output"][0])["input_ids"]
    assert tokenizer.decode(target, skip_special_tokens=True) == rows["output"][0]

    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded(text)["input_ids"] == ids
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (1, 2)
    batch = reloaded(["short one", text], padding=True)["input_ids"]
    assert batch[0][-1] == 1 and len(batch[0]) == len(batch[1])


def test_split_digits_gives_one_token_per_digit_wherever_a_number_stands(tmp_path):
    numbers = [str(n) for n in range(10000, 99999, 37)]
    texts = [f"the number is {a} and then {b}." for a, b in zip(numbers, reversed(numbers), strict=True)]
    split = train_sentencepiece_tokenizer(texts, tmp_path / "split", vocab_size=300, split_digits=True)
    merged = train_sentencepiece_tokenizer(texts, tmp_path / "merged", vocab_size=300)
    for text in ("is 48213 .", "is 48213.", "(48213)"):
        pieces = split.tokenize(text)
        assert [piece for piece in pieces if any(c.isdigit() for c in piece)] == list("48213"), pieces
    assert any(sum(c.isdigit() for c in piece) > 1 for piece in merged.tokenize("is 48213 and 10037."))
    tokens = split("is 48213 .")["input_ids"]
    assert split.decode(tokens, skip_special_tokens=True) == "is 48213 ."
