"""A small synthetic long-document dataset in the SCROLLS format, its tokenizer and its naive baselines.

`make demo` must run end to end offline on a laptop CPU, so it cannot use the real SCROLLS files. This module writes
three tasks under the SCROLLS config names, so the task table (metric, query-first inputs, target lengths) and the
official scorer apply unchanged:

* `gov_report` (ROUGE): a multi-section report; its summary names the agency stated in the first section, the topic
  from the title, and the finding stated in the last section, thousands of tokens later.
* `qasper` (F1): "What is the code name of the <entity> project?" + "\\n\\n" + a document in which that project's
  code name is planted once, among other projects' code names (distractors), far from the question.
* `contract_nli` (exact match): a hypothesis "The Receiving Party is allowed to <action>." + "\\n\\n" + a
  contract holding a few permission / prohibition clauses; the label (Entailment / Contradiction / Not mentioned) is
  decided by the statement on the hypothesis' action: "may", "shall not", or a wording that neither permits nor
  forbids.

Every answer is planted past the first quarter of its document and competes with distractors of the same form, so a
model must read far and match the query against the right fact; everything else is filler drawn from a modest
vocabulary, so a SentencePiece vocabulary of ~1K pieces covers it word for word. Generation is deterministic for a
given seed. See docs/demo.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from scrolls_ssm.data import SPLITS, get_task
from scrolls_ssm.metrics import compute_scrolls_metrics

SYNTHETIC_TASKS = ("gov_report", "qasper", "contract_nli")
NLI_LABELS = ("Entailment", "Contradiction", "Not mentioned")

# --- vocabulary -----------------------------------------------------------------------------------------------------
# Filler words never include a planted answer word, so answers occur only where they are planted.
_NOUNS = (
    "budget committee office network program survey region county station record staff council schedule review "
    "account contractor facility district supplier inspection vehicle building system process method standard "
    "project team member manager officer resident citizen worker unit service plan policy rule measure "
    "report study agency market price cost fund grant loan payment field road bridge river harbor school clinic"
).split()
_ADJECTIVES = (
    "annual regional local federal public private formal general careful detailed modest large small recent "
    "early late current former internal external overall minor major basic initial final joint separate"
).split()
_VERBS = (
    "reviewed updated approved examined recorded described measured compared collected reported managed "
    "planned checked supported delayed funded adjusted assessed noted listed tracked organized prepared"
).split()
_ADVERBS = "quickly slowly carefully regularly partly largely mostly rarely often usually clearly gradually".split()
_PREPOSITIONS = "for within across near under over after before during beside through along".split()
_OPENERS = (
    "In addition,",
    "At the same time,",
    "For this reason,",
    "In practice,",
    "Over the period,",
    "By contrast,",
    "As a result,",
    "In most cases,",
    "According to staff,",
    "During the year,",
)

# gov_report slots: a summary is "The <agency> report on <topic> finds that <subject> <change>."
_AGENCIES = (
    "Office of Rural Water",
    "Bureau of Coastal Roads",
    "Department of Forest Care",
    "Agency for Public Housing",
    "Office of Child Safety",
    "Bureau of Farm Credit",
    "Department of Port Security",
    "Office of Veteran Affairs",
    "Agency for Clean Energy",
    "Bureau of Mine Safety",
    "Department of Air Travel",
    "Office of Food Quality",
)
_TOPICS = (
    "bridge maintenance",
    "school lunches",
    "flood insurance",
    "rail freight",
    "drinking water",
    "wildfire response",
    "prison healthcare",
    "broadband access",
    "tax refunds",
    "postal delivery",
    "disaster loans",
    "nurse training",
)
_SUBJECTS = (
    "repair costs",
    "waiting times",
    "staff turnover",
    "fraud cases",
    "user complaints",
    "energy use",
    "processing delays",
    "safety incidents",
    "program enrollment",
    "contract spending",
)
_CHANGES = (
    "rose sharply",
    "fell slightly",
    "stayed flat",
    "doubled",
    "declined steadily",
    "increased modestly",
    "dropped by half",
    "varied widely",
)

# qasper slots: "What is the code name of the <entity> project?" -> "<code name>"
_ENTITIES = (
    "Amber Atlas Beacon Cedar Cobalt Coral Crescent Delta Ember Falcon Garnet Glacier Granite Hazel Indigo Iris "
    "Jasper Juniper Lagoon Lotus Maple Meadow Nimbus Onyx Opal Orbit Pebble Prairie Quartz Raven Sable Sierra "
    "Solstice Summit Tundra Velvet Willow Zephyr"
).split()
_CODE_NAMES = (
    "Albatross Badger Bison Condor Coyote Dingo Ferret Gazelle Heron Ibex Jackal Kestrel Lynx Marmot Mongoose "
    "Narwhal Ocelot Osprey Panther Pelican Puffin Raccoon Salmon Starling Tapir Toucan Vulture Walrus Wombat Yak"
).split()

# contract_nli slots: "The Receiving Party may <action>." / "The Receiving Party shall not <action>."
_ACTIONS = (
    "disclose confidential information to affiliates",
    "retain copies after termination",
    "assign this agreement to a successor",
    "use the information for internal research",
    "hire employees of the disclosing party",
    "reverse engineer the supplied samples",
    "share the terms with its advisors",
    "store the data outside the country",
    "issue public announcements about the deal",
    "grant sublicenses to third parties",
    "subcontract the services to vendors",
    "combine the information with public data",
)
_PARTY = "The Receiving Party"
# "Not mentioned": the contract speaks of the action but neither permits nor forbids it.
_NON_BINDING = ("discussed whether to", "was asked whether it would", "has not decided whether to")


# --- filler ---------------------------------------------------------------------------------------------------------


def filler_sentence(rng: random.Random) -> str:
    """One plain sentence from a few templates; the variety keeps a model from memorising positions of filler."""
    noun, noun2, noun3 = rng.sample(_NOUNS, 3)
    adjective, adjective2 = rng.sample(_ADJECTIVES, 2)
    verb, adverb, preposition = rng.choice(_VERBS), rng.choice(_ADVERBS), rng.choice(_PREPOSITIONS)
    template = rng.randrange(5)
    if template == 0:
        sentence = f"the {adjective} {noun} {verb} the {noun2} {preposition} the {adjective2} {noun3}."
    elif template == 1:
        sentence = f"each {noun} was {adverb} {verb} by the {adjective} {noun2}."
    elif template == 2:
        sentence = f"the {noun} and the {noun2} {verb} {rng.randint(2, 99)} {noun3} records {preposition} the year."
    elif template == 3:
        sentence = f"a {adjective} {noun} {adverb} {verb} the {noun2} of the {noun3}."
    else:
        sentence = f"staff {verb} whether the {noun} {preposition} the {noun2} was {adjective}."
    if rng.random() < 0.3:
        return f"{rng.choice(_OPENERS)} {sentence}"
    return sentence[0].upper() + sentence[1:]


def _filler(rng: random.Random, words: int) -> list[str]:
    """Filler sentences totalling about `words` words."""
    sentences: list[str] = []
    count = 0
    while count < words:
        sentences.append(filler_sentence(rng))
        count += len(sentences[-1].split())
    return sentences


def _plant(rng: random.Random, sentences: list[str], facts: Sequence[str], start_fraction: float) -> None:
    """Insert each fact at its own random sentence boundary at or after `start_fraction` of the document."""
    for fact in facts:
        first = int(len(sentences) * start_fraction)
        sentences.insert(rng.randint(first, len(sentences)), fact)


def _paragraphs(sentences: Sequence[str], rng: random.Random) -> str:
    """Join sentences into paragraphs of 4-8 sentences, one paragraph per line."""
    lines, start = [], 0
    while start < len(sentences):
        size = rng.randint(4, 8)
        lines.append(" ".join(sentences[start : start + size]))
        start += size
    return "\n".join(lines)


# --- the three tasks ------------------------------------------------------------------------------------------------


def _gov_report_example(
    rng: random.Random, doc_words: int, num_distractors: int, mentions: int, plant_after: float
) -> tuple[str, str]:
    """A report of several sections; agency in section 1, finding in the last, distractor findings in between.
    With `mentions` > 1 the agency is named again in later sections and the finding restated in the last one."""
    agency, *other_agencies = rng.sample(_AGENCIES, 1 + num_distractors)
    topic = rng.choice(_TOPICS)
    finding = f"{rng.choice(_SUBJECTS)} {rng.choice(_CHANGES)}"
    num_sections = 5
    section_words = doc_words // num_sections
    sections = [_filler(rng, section_words) for _ in range(num_sections)]
    _plant(rng, sections[0], [f"This report was prepared by the {agency}."], 0.0)
    for _ in range(mentions - 1):
        _plant(rng, sections[rng.randint(1, num_sections - 1)], [f"The {agency} reviewed this section."], 0.0)
    middle = [
        f"An earlier review by the {other} had found that {rng.choice(_SUBJECTS)} {rng.choice(_CHANGES)}."
        for other in other_agencies
    ]
    for fact in middle:
        _plant(rng, sections[rng.randint(1, num_sections - 2)], [fact], 0.0)
    _plant(rng, sections[-1], [f"In conclusion, the review finds that {finding}."] * mentions, max(plant_after, 0.3))
    body = "\n".join(f"Section {index + 1}.\n{_paragraphs(section, rng)}" for index, section in enumerate(sections))
    title = f"A review of {topic}."
    return f"{title}\n{body}", f"The {agency} report on {topic} finds that {finding}."


def _qasper_example(
    rng: random.Random, doc_words: int, num_distractors: int, mentions: int, plant_after: float
) -> tuple[str, str]:
    """One project's code name planted among `num_distractors` other projects' code names, each stated
    `mentions` times."""
    entities = rng.sample(_ENTITIES, 1 + num_distractors)
    code_names = rng.sample(_CODE_NAMES, 1 + num_distractors)
    facts = [
        f"The {entity} project carries the code name {code}."
        for entity, code in zip(entities, code_names, strict=True)
    ]
    sentences = _filler(rng, doc_words)
    _plant(rng, sentences, facts * mentions, plant_after)
    question = f"What is the code name of the {entities[0]} project?"
    return f"{question}\n\n{_paragraphs(sentences, rng)}", code_names[0]


def _contract_nli_example(
    rng: random.Random, doc_words: int, num_distractors: int, mentions: int, plant_after: float, label: str
) -> tuple[str, str]:
    """A contract with one statement on the hypothesis' action and `num_distractors` clauses on other actions, each
    stated `mentions` times. `label` decides the statement: a permission ("may": Entailment), a prohibition
    ("shall not": Contradiction), or a mention that neither permits nor forbids ("Not mentioned", as in ContractNLI:
    neither entailed nor contradicted). Every label has the same statement count and the action in the same place,
    so only the statement's wording gives the label; with distractors, only the one on the hypothesis' action. The
    hypothesis is worded unlike every statement, so none of them repeats it."""
    hypothesis_action, *other_actions = rng.sample(_ACTIONS, 1 + num_distractors)
    wording = {"Entailment": "may", "Contradiction": "shall not"}.get(label) or rng.choice(_NON_BINDING)
    clauses = [f"{_PARTY} {wording} {hypothesis_action}."]
    clauses += [f"{_PARTY} {rng.choice(('may', 'shall not'))} {action}." for action in other_actions]
    sentences = _filler(rng, doc_words)
    _plant(rng, sentences, clauses * mentions, plant_after)
    body = _paragraphs(sentences, rng)
    numbered = "\n".join(f"{index + 1}. {line}" for index, line in enumerate(body.split("\n")))
    hypothesis = f"{_PARTY} is allowed to {hypothesis_action}."  # a paraphrase, as ContractNLI's hypotheses are
    return f"{hypothesis}\n\nNON-DISCLOSURE AGREEMENT\n{numbered}", label


def _rows(
    task: str,
    split: str,
    count: int,
    words: tuple[int, int],
    num_distractors: int,
    mentions: int,
    plant_after: float,
    seed: int,
) -> Iterator[dict]:
    """The rows of one split. Every row has its own generator, so a row never depends on how many rows are written
    (more training rows extend a split, other splits stay the same). contract_nli labels come in shuffled blocks of
    all three, so any prefix of a split is balanced to within one."""
    for index in range(count):
        rng = random.Random(f"{seed}/{task}/{split}/{index}")
        length = round(math.exp(rng.uniform(math.log(words[0]), math.log(words[1]))))
        if task == "gov_report":
            text, output = _gov_report_example(rng, length, num_distractors, mentions, plant_after)
        elif task == "qasper":
            text, output = _qasper_example(rng, length, num_distractors, mentions, plant_after)
        else:
            block = list(NLI_LABELS)
            random.Random(f"{seed}/{task}/{split}/labels/{index // len(block)}").shuffle(block)
            label = block[index % len(block)]
            text, output = _contract_nli_example(rng, length, num_distractors, mentions, plant_after, label)
        id_ = f"{task}-{split}-{index:05d}"
        yield {"id": id_, "pid": f"{id_}_0", "input": text, "output": None if split == "test" else output}


def write_synthetic_scrolls(
    out_dir: str | os.PathLike[str],
    num_train: int = 2000,
    num_validation: int = 100,
    num_test: int = 100,
    doc_words: int = 1500,
    min_train_doc_words: int | None = None,
    max_train_doc_words: int | None = None,
    num_distractors: int = 2,
    mentions: int = 1,
    plant_after: float = 0.25,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    seed: int = 0,
) -> Path:
    """Write `<out_dir>/<task>/{train,validation,test}.jsonl` in the SCROLLS format and return `out_dir`.

    doc_words: typical document length in words: validation and test documents draw theirs from 0.8x-1.2x of it
    (with the demo tokenizer a word is ~1.15 tokens). min_train_doc_words: training documents draw theirs
    log-uniformly from this to 1.2 x doc_words instead (None: like the others). A model trained from scratch
    learns to find a fact far sooner in short documents, where attention to it is not diluted over thousands of
    positions, and carries that over to long ones; the long training documents train the far positions.
    max_train_doc_words: the longest training document (None: 1.2 x doc_words). Below doc_words, a model is trained
    on short documents only and evaluated on longer ones: what an encoder without a position table can do.
    num_distractors: facts of the same form as the answer's (other projects' code names, other agencies' findings,
    clauses on other actions), which a model must tell apart from the queried one. mentions: how often each fact
    is stated (all of them far from the query, past the first quarter of the document; the finding in the last
    section): a fact stated once is a single needle whose gradient, through untrained attention, is diluted over
    thousands of positions; a few restatements let a small model learn to find facts within minutes.
    plant_after: the fraction of a document before which no queried fact is stated (the gov_report finding: of its
    last section, at least 0.3). With 0.3 and 4,000-token documents, a model reading only the first 1,024 tokens
    sees none of the QA and NLI facts. Test rows have `output: null`, as in SCROLLS.
    """
    if mentions < 1:
        raise ValueError(f"mentions={mentions}: each fact must be stated at least once.")
    unknown = [task for task in tasks if task not in SYNTHETIC_TASKS]
    if unknown:
        raise ValueError(f"no synthetic version of task(s) {unknown}; synthetic tasks: {', '.join(SYNTHETIC_TASKS)}.")
    if not 0 <= plant_after < 1:
        raise ValueError(f"plant_after={plant_after} must be a fraction of the document in [0, 1).")
    longest_train = max_train_doc_words or doc_words * 6 // 5
    shortest = min(doc_words, min_train_doc_words or doc_words, longest_train)
    if shortest < 50:
        raise ValueError(
            f"doc_words={doc_words}, min_train_doc_words={min_train_doc_words}, max_train_doc_words="
            f"{max_train_doc_words}: documents need at least 50 words to hide facts in."
        )
    limits = {"gov_report": len(_AGENCIES) - 1, "qasper": len(_CODE_NAMES) - 1, "contract_nli": len(_ACTIONS) - 1}
    if not 0 <= num_distractors <= min(limits[task] for task in tasks):
        raise ValueError(
            f"num_distractors={num_distractors} must be between 0 and {min(limits[task] for task in tasks)} "
            f"for tasks {list(tasks)} (each distractor needs its own agency, code name or action)."
        )
    out = Path(out_dir)
    sizes = dict(zip(SPLITS, (num_train, num_validation, num_test), strict=True))
    for task in tasks:
        (out / task).mkdir(parents=True, exist_ok=True)
        for split, count in sizes.items():
            if split == "train":
                words = (min(min_train_doc_words or doc_words * 4 // 5, longest_train), longest_train)
            else:
                words = (doc_words * 4 // 5, doc_words * 6 // 5)
            path = out / task / f"{split}.jsonl"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in _rows(task, split, count, words, num_distractors, mentions, plant_after, seed):
                    handle.write(json.dumps(row) + "\n")
            os.replace(tmp, path)  # a reader never sees a half-written split
    return out


# --- tokenizer ------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def _training_lines(texts: Iterable[str], max_chars: int = 2000) -> Iterator[str]:
    """Texts as lines no longer than `max_chars`: SentencePiece skips any "sentence" over its length limit, and
    SCROLLS inputs are whole documents."""
    for text in texts:
        for line in text.split("\n"):
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                yield line[:cut]
                line = line[cut:].lstrip()
            if line.strip():
                yield line


def _bpe_merges(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The merge list of a SentencePiece BPE model: SentencePiece stores only pieces in merge order, and every way
    of splitting a piece into two pieces is a merge ranked by the merged piece's id."""
    merges = [
        (vocab[piece], vocab[piece[:cut]], vocab[piece[cut:]], piece[:cut], piece[cut:])
        for piece in vocab
        for cut in range(1, len(piece))
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]
    return [(left, right) for *_, left, right in sorted(merges)]


def _train_sentencepiece(
    texts: Iterable[str], model_prefix: Path, vocab_size: int, max_lines: int, split_digits: bool, **layout
) -> None:
    """Train `model_prefix`.model on `texts` (at most `max_lines` lines) with the settings every style shares;
    `layout` holds the style's own (model type, special ids, normalization)."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as handle:
            for count, line in enumerate(_training_lines(texts)):
                if count >= max_lines:
                    break
                handle.write(line + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            character_coverage=1.0,
            split_digits=split_digits,
            # Small corpora cannot always fill the requested vocabulary; a smaller one is fine.
            hard_vocab_limit=False,
            minloglevel=2,
            **layout,
        )


def _train_t5_sentencepiece(
    texts: Iterable[str], out: Path, vocab_size: int, max_lines: int, split_digits: bool, extra_ids: int
) -> PreTrainedTokenizerBase:
    """A T5-style SentencePiece Unigram model in `out/spiece.model`, loaded as T5 checkpoints' models are."""
    from transformers import T5Tokenizer

    _train_sentencepiece(
        texts,
        out / "spiece",
        vocab_size,
        max_lines,
        split_digits,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
    )
    return T5Tokenizer.from_pretrained(out, extra_ids=extra_ids)


def train_sentencepiece_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 1000,
    max_lines: int = 200_000,
    split_digits: bool = False,
    style: str = "bart",
    extra_ids: int = 0,
) -> PreTrainedTokenizerBase:
    """Train a SentencePiece model in-process and return it as a `transformers` tokenizer.

    `style="bart"` (the default) gives the BPE tokenizer described below. `style="t5"` gives a T5-family one: a
    SentencePiece Unigram model with T5's ids (<pad>=0, </s>=1, <unk>=2, no <s>; an encoded text is `... </s>`),
    written as `out_dir/spiece.model` and loaded the way a T5 checkpoint's SentencePiece model is loaded
    (`T5Tokenizer.from_pretrained(out_dir)`, offline), with `extra_ids` sentinel tokens `<extra_id_0>`, ... at the end
    of the vocabulary (T5 checkpoints have 100; they mark masked spans in denoising, none are needed to fine-tune).
    Use it to train a `model.family=t5` model from scratch.

    The ids are BART's (<s>=0, <pad>=1, </s>=2, <unk>=3) and an encoded text is `<s> ... </s>`, as BART's is, so
    the model config's special ids and `decoder_start_token_id=</s>` mean the same as for a BART checkpoint. The
    SentencePiece model is converted to a `tokenizers` BPE model with the same pieces and merges (newlines are kept as
    pieces of their own), so `save_pretrained` writes a plain tokenizer.json that
    `AutoTokenizer.from_pretrained` reads offline without sentencepiece. `out_dir` receives `spm.model`.
    `split_digits=True` makes every digit a piece of its own, so a number is always split the same way (one token per
    digit) wherever it occurs: what a model that copies numbers needs.
    """
    if style not in ("bart", "t5"):
        raise ValueError(f"style={style!r} is not a tokenizer style; expected 'bart' or 't5'.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if style == "t5":
        return _train_t5_sentencepiece(texts, out, vocab_size, max_lines, split_digits, extra_ids)
    _train_sentencepiece(
        texts,
        out / "spm",
        vocab_size,
        max_lines,
        split_digits,
        model_type="bpe",
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        bos_piece=SPECIAL_TOKENS["bos_token"],
        pad_piece=SPECIAL_TOKENS["pad_token"],
        eos_piece=SPECIAL_TOKENS["eos_token"],
        unk_piece=SPECIAL_TOKENS["unk_token"],
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    processor = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    vocab = {processor.id_to_piece(index): index for index in range(processor.get_piece_size())}
    backend = Tokenizer(models.BPE(vocab, _bpe_merges(vocab), unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split("▁", behavior="merged_with_next")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


# --- naive baselines ------------------------------------------------------------------------------------------------


def best_constant_prediction(task: str, outputs: Sequence[str], max_candidates: int = 50, max_refs: int = 300) -> str:
    """The one training output that, predicted for every example, scores best on the training outputs.

    Candidates are the `max_candidates` most frequent distinct outputs, each scored with the task's official metric
    against a fixed sample of `max_refs` training outputs. For exact match and single-word F1 answers this is the
    most frequent answer; for summaries it is the "medoid" summary, which shares the most template words and slot
    values with the others: a stronger baseline than the most frequent summary, which is a random one when almost
    every summary is unique.
    """
    if not outputs:
        raise ValueError("best_constant_prediction needs at least one training output.")
    candidates = [text for text, _ in Counter(outputs).most_common(max_candidates)]
    references = random.Random(0).sample(list(outputs), min(max_refs, len(outputs)))
    refs = {str(index): [text] for index, text in enumerate(references)}

    def train_score(candidate: str) -> float:
        metrics = compute_scrolls_metrics(task, dict.fromkeys(refs, candidate), refs)
        return float(metrics["scrolls_score"] or 0.0)

    return max(candidates, key=train_score)  # max keeps the first (most frequent) candidate among ties


def naive_baseline(
    task: str, train_rows: Iterable[Mapping[str, Any]], references: Mapping[str, Sequence[str]]
) -> dict[str, float | int | None]:
    """Official metrics of predicting `best_constant_prediction` (fit on `train_rows`' outputs) for every id.

    `train_rows` is a SCROLLS training Dataset or any iterable of rows with an `output` field; `references` maps each
    evaluated id to its reference outputs, as `data.group_references` returns them.
    """
    get_task(task)
    outputs = [row["output"] for row in train_rows if row["output"] is not None]
    constant = best_constant_prediction(task, outputs)
    return compute_scrolls_metrics(task, dict.fromkeys(references, constant), references)
