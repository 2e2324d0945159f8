"""One process of the FSDP2 test (tests/test_fsdp.py), started twice by torchrun: shard a saved model with
`fully_shard` over gloo (CPU), then run the project's own evaluation and saving code on it.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py MODEL DATA OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from scrolls_ssm.checkpointing import save_model
from scrolls_ssm.config import load_run_config
from scrolls_ssm.evaluation import generate_predictions, validation_loss
from scrolls_ssm.preprocess import Seq2SeqCollator
from scrolls_ssm.train import _tokenize_evaluation

EVAL_TOKENS = 120  # one or two rows per batch: the two processes get different numbers of batches


def evaluate_and_save(model, model_dir: Path, data: Path, out: Path, accelerator: Accelerator) -> dict:
    """Validation loss and predictions of `model` on the validation split, and `save_model` into `out`; the single-
    process reference in the test calls this same function."""
    cfg = load_run_config(None, [f"data.data_dir={data}", "data.tasks=[contract_nli]", f"train.output_dir={out}"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (eval_set,) = _tokenize_evaluation(cfg, tokenizer, str(data), source_limit=96)[0]
    eval_set.max_new_tokens = 12
    collator = Seq2SeqCollator(tokenizer, pad_to_multiple_of=8)
    # Generation first: on a sharded model that has never run a full forward (the test split has no loss to compute).
    predictions = generate_predictions(model, eval_set, tokenizer, accelerator, collator, EVAL_TOKENS)
    loss = validation_loss(model, eval_set.loss_rows, accelerator, collator, EVAL_TOKENS)
    save_model(accelerator, model, tokenizer, cfg, out, step=0)
    return {"loss": loss, "predictions": predictions}


def main(model_dir: Path, data: Path, out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        fully_shard(layer)
    fully_shard(model)
    result = evaluate_and_save(model, model_dir, data, out, accelerator)
    if accelerator.is_main_process:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
