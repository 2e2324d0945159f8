"""Tokenization, token-budget batching (alone and sharded by accelerate) and collation."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from scrolls_fixtures import make_tokenizer
from torch.utils.data import DataLoader

from scrolls_ssm.preprocess import (
    Seq2SeqCollator,
    TokenBudgetBatchSampler,
    predictions_by_id,
    sequence_lengths,
    tokenize_for_seq2seq,
)

LONG_WORD = "supercalifragilisticexpialidocious"  # 34 characters, one token


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(["what did the author say", "the cat sat on mat answer yes no", LONG_WORD])


def _rows(outputs):
    return datasets.Dataset.from_list(
        [
            {
                "id": f"id{i}",
                "pid": f"id{i}_0",
                "input": "what did the author say\n\nthe cat sat on the mat",
                "output": out,
            }
            for i, out in enumerate(outputs)
        ]
    )


def test_tokenize_truncates_on_the_right_so_the_query_survives(tokenizer):
    tokenized = tokenize_for_seq2seq(_rows(["yes the cat", "no"]), tokenizer, max_source_length=6, max_target_length=3)
    assert tokenized.column_names == ["id", "input_ids", "attention_mask", "row_idx", "labels"]
    query = tokenizer("what did the author say")["input_ids"][:-1]  # without </s>
    assert tokenized[0]["input_ids"] == query + [tokenizer.eos_token_id]  # 5 query tokens + </s>
    assert tokenized[0]["attention_mask"] == [1] * 6
    assert tokenized["labels"][:] == [tokenizer("yes the")["input_ids"], tokenizer("no")["input_ids"]]
    assert tokenized["row_idx"][:] == [0, 1]
    assert tokenized["id"][:] == ["id0", "id1"]


def test_test_split_has_no_labels_and_mixed_outputs_are_rejected(tokenizer):
    tokenized = tokenize_for_seq2seq(_rows([None, None]), tokenizer, 16, 4)
    assert "labels" not in tokenized.column_names
    with pytest.raises(ValueError, match="1 of 2 rows have output None"):
        tokenize_for_seq2seq(_rows(["yes", None]), tokenizer, 16, 4)


def test_left_truncation_is_refused(tokenizer):
    tokenizer.truncation_side = "left"
    try:
        with pytest.raises(ValueError, match="truncation_side is 'left'.*set tokenizer.truncation_side = 'right'"):
            tokenize_for_seq2seq(_rows(["yes"]), tokenizer, 16, 4)
    finally:
        tokenizer.truncation_side = "right"


def test_narrative_qa_inputs_are_cut_by_characters_first(tokenizer):
    rows = datasets.Dataset.from_list(
        [{"id": "n", "pid": "n_0", "input": " ".join([LONG_WORD] * 10), "output": "yes"}]
    )
    # max_source_length 4 -> 40 characters kept -> one 34-character word (the second is cut mid-word -> <unk>).
    trimmed = tokenize_for_seq2seq(rows, tokenizer, 4, 4, task="narrative_qa")
    untrimmed = tokenize_for_seq2seq(rows, tokenizer, 4, 4, task="qasper")
    word, unk, eos = tokenizer.convert_tokens_to_ids(LONG_WORD), tokenizer.unk_token_id, tokenizer.eos_token_id
    assert trimmed[0]["input_ids"] == [word, unk, eos]
    assert untrimmed[0]["input_ids"] == [word, word, word, eos]


def test_sequence_lengths(tokenizer):
    tokenized = tokenize_for_seq2seq(_rows(["a", "b"]), tokenizer, 7, 4)
    assert sequence_lengths(tokenized) == [7, 7]
    assert sequence_lengths(tokenized, "labels") == [2, 2]


def test_packing_by_hand():
    # Sorted by length: 8 (row 2), 7 (row 4), 5 (row 0), 3 (row 1), 2 (row 3); budget 10.
    sampler = TokenBudgetBatchSampler([5, 3, 8, 2, 7], max_tokens=10, shuffle=False)
    assert list(sampler) == [[2], [4], [0, 1], [3]]
    assert len(sampler) == 4
    # The leftover [3] (2 tokens) could take 4 more rows of its length: drop_last drops it.
    assert list(TokenBudgetBatchSampler([5, 3, 8, 2, 7], max_tokens=10, shuffle=False, drop_last=True)) == [
        [2],
        [4],
        [0, 1],
    ]
    # A full leftover batch is kept even with drop_last.
    assert list(TokenBudgetBatchSampler([5, 5, 4, 4], max_tokens=10, shuffle=False, drop_last=True)) == [
        [0, 1],
        [2, 3],
    ]


def _random_lengths():
    lengths = np.random.default_rng(0).integers(1, 100, size=300).tolist()
    lengths[17] = 700  # longer than the budget: must get a batch of its own, not vanish
    return lengths


def test_sampler_invariants():
    lengths = _random_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=512, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(index for batch in batches for index in batch) == list(range(300))  # every row exactly once
    assert [17] in batches
    for batch in batches:
        if batch != [17]:
            assert max(lengths[i] for i in batch) * len(batch) <= 512
    # Length-grouped: padding is under 5% of the padded tokens.
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    assert sum(lengths) / padded > 0.95


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = _random_lengths()
    first = TokenBudgetBatchSampler(lengths, max_tokens=512, seed=3)
    second = TokenBudgetBatchSampler(lengths, max_tokens=512, seed=3)
    epoch0 = list(first)
    assert list(second) == epoch0
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0)
    assert sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))  # ties land in different batches
    second.set_epoch(1)
    assert list(second) == epoch1
    assert list(TokenBudgetBatchSampler(lengths, max_tokens=512, seed=4)) != epoch0


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        TokenBudgetBatchSampler([1, 2], max_tokens=0)
    with pytest.raises(ValueError, match="non-negative token counts"):
        TokenBudgetBatchSampler([1, -2], max_tokens=4)


def test_accelerate_shards_whole_batches_and_advances_epochs():
    lengths = _random_lengths()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=512, seed=3)
    everything = list(sampler)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-len(everything) // 2)
    # Round-robin: process 0 takes batches 0, 2, 4, ... and process 1 takes 1, 3, 5, ...
    assert shards[0][: len(everything) // 2] == everything[0::2][: len(everything) // 2]
    assert shards[1][: len(everything) // 2] == everything[1::2][: len(everything) // 2]
    covered = {index for shard in shards for batch in shard for index in batch}
    assert covered == set(range(300))

    # Through prepare_data_loader, the DataLoaderShard sets the epoch on every pass by itself.
    dataset = [{"input_ids": [1] * n, "attention_mask": [1] * n} for n in lengths]
    loader = DataLoader(dataset, batch_sampler=TokenBudgetBatchSampler(lengths, 512, seed=3), collate_fn=len)
    shard = prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False)
    assert list(shard) == [len(batch) for batch in shards[0]]
    assert loader.batch_sampler.epoch == 0
    list(shard)
    assert loader.batch_sampler.epoch == 1


def test_collator_pads_right_and_returns_tensors_only(tokenizer):
    rows = [
        {"id": "a", "input_ids": [5, 6, 1], "attention_mask": [1, 1, 1], "labels": [7, 1], "row_idx": 4},
        {"id": "b", "input_ids": [5, 6, 7, 8, 1], "attention_mask": [1] * 5, "labels": [1], "row_idx": 9},
    ]
    batch = Seq2SeqCollator(tokenizer)(rows)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "row_idx"]
    assert batch["input_ids"].tolist() == [[5, 6, 1, 0, 0], [5, 6, 7, 8, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[7, 1], [1, -100]]
    assert batch["row_idx"].tolist() == [4, 9] and batch["row_idx"].dtype == torch.int64
    padded = Seq2SeqCollator(3, pad_to_multiple_of=4, label_pad_token_id=-1)(
        [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    )
    assert padded["input_ids"].shape == (2, 8) and padded["input_ids"][0, 3:].tolist() == [3] * 5
    assert "labels" not in padded


def test_dataloader_end_to_end(tokenizer):
    tokenized = tokenize_for_seq2seq(_rows(["yes", "no the cat", "yes"]), tokenizer, 12, 8)
    sampler = TokenBudgetBatchSampler(sequence_lengths(tokenized), max_tokens=24, shuffle=False)
    loader = DataLoader(tokenized, batch_sampler=sampler, collate_fn=Seq2SeqCollator(tokenizer))
    batches = list(loader)
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(2, 12), (1, 12)]
    assert sorted(i for batch in batches for i in batch["row_idx"].tolist()) == [0, 1, 2]
    ids = [tokenized["id"][i] for batch in batches for i in batch["row_idx"].tolist()]
    assert sorted(ids) == ["id0", "id1", "id2"]


def test_predictions_by_id_drops_accelerate_repeats():
    # 7 batches over 2 processes: accelerate repeats batch 0 so both processes run 4 batches.
    sampler = TokenBudgetBatchSampler([4, 4, 3, 3, 2, 2, 2, 1, 1], max_tokens=4, shuffle=False)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
    gathered = [index for step in zip(*shards, strict=True) for batch in step for index in batch]
    assert list(sampler) == [[0], [1], [2], [3], [4, 5], [6, 7], [8]]
    assert gathered == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]  # the repeat of batch 0 comes back from the gather
    ids = [f"id{i}" for i in range(9)]
    texts = [f"text {index}" for index in gathered[:9]] + ["repeat"]
    predictions = predictions_by_id(torch.tensor(gathered), texts, ids)
    assert predictions == {f"id{i}": f"text {i}" for i in range(9)}  # the first prediction of a row is kept
