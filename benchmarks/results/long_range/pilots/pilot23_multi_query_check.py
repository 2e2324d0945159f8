"""Pilot 23 of docs/long_range.md: does a model trained beside multi_query_needle rows match keys on new ones?

    python benchmarks/results/long_range/pilots/pilot23_multi_query_check.py RUN/model

Greedy answers to 24 new multi-query inputs of 256 tokens: exact matches, the share of values in their asked slot
(a random order puts 25% there) and the share in the document's order.
"""

import random
import re
import sys

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from scrolls_ssm.probe import probe_example


def main(folder: str, count: int = 24) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    exact = in_slot = in_document_order = 0.0
    for index in range(count):
        text, answer = probe_example("multi_query_needle", 256, None, random.Random(f"check{index}"), tokens)
        document_values = re.findall(r"number for the [a-z ]+ is (\d+) \.", text.split("\n\n", 1)[1])
        with torch.no_grad():
            output = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=32, num_beams=1)
        predicted, wanted = tokenizer.decode(output[0], skip_special_tokens=True).split(), answer.split()
        exact += predicted == wanted
        in_slot += sum(a == b for a, b in zip(predicted, wanted, strict=False)) / len(wanted)
        in_document_order += sum(a == b for a, b in zip(predicted, document_values, strict=False)) / len(wanted)
    print(
        f"exact {exact:.0f}/{count}, values in the asked slot {in_slot / count:.2f}, "
        f"in document order {in_document_order / count:.2f}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
