"""The model with transformers' `Seq2SeqTrainer`: gradient accumulation gives the update of one big batch, and the
optimizer helpers give Trainer users the state-space parameter groups (own learning rate, no weight decay)."""

from __future__ import annotations

import pytest
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer

from scrolls_ssm import optimizer_cls_and_kwargs, ssm_param_groups
from tests.conftest import tiny_model

# Target lengths differ between rows, so a loss averaged per micro-batch would weigh tokens differently from the
# loss of the whole batch.
LABEL_LENGTHS = [2, 9, 4, 6]
SOURCE_LENGTH = 12


def _examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {
            "input_ids": torch.randint(4, 120, (SOURCE_LENGTH,), generator=g),
            "attention_mask": torch.ones(SOURCE_LENGTH, dtype=torch.long),
            "labels": torch.randint(4, 120, (length,), generator=g),
        }
        for length in LABEL_LENGTHS
    ]


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks the sources (all one length) and right-pads the labels with -100."""
    labels = torch.nn.utils.rnn.pad_sequence([row["labels"] for row in rows], batch_first=True, padding_value=-100)
    return {
        "input_ids": torch.stack([row["input_ids"] for row in rows]),
        "attention_mask": torch.stack([row["attention_mask"] for row in rows]),
        "labels": labels,
    }


def _arguments(output_dir, **overrides) -> Seq2SeqTrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        max_steps=1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: it would hide a wrongly scaled gradient
        dataloader_num_workers=0,
        seed=0,
    )
    return Seq2SeqTrainingArguments(**{**settings, **overrides})


def _one_update(tmp_path, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """The parameter change after one optimizer step of plain SGD over all four examples."""
    model = tiny_model(encoder_layer_types=["s4d", "attention"], s4d_d_state=8)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = _arguments(
        tmp_path / f"b{batch_size}x{accumulation}",
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
    )
    # SGD: the update is proportional to the gradient, so a wrong loss scale shows (Adam's first step would hide it).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=_examples(), data_collator=_collate, optimizers=(optimizer, None)
    )
    trainer.train()
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def test_gradient_accumulation_update_equals_one_big_batch(tmp_path):
    """2 micro-batches x accumulation 2 == 1 batch of 4: the Trainer passes `num_items_in_batch` and does not
    divide the loss by the accumulation steps, so the model must normalize by the whole batch's target tokens."""
    accumulated = _one_update(tmp_path, batch_size=2, accumulation=2)
    whole = _one_update(tmp_path, batch_size=4, accumulation=1)
    largest = max(update.abs().max().item() for update in whole.values())
    assert largest > 1e-3, f"the update is too small to compare ({largest:.3g})"
    worst = max((accumulated[name] - whole[name]).abs().max().item() for name in whole)
    assert worst <= 1e-6 * max(1.0, largest), (
        f"accumulated update differs by {worst:.3g} (largest entry {largest:.3g})"
    )


def _groups_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("route", ["optimizer_cls_and_kwargs", "optimizers from args", "ssm_param_groups"])
def test_trainer_with_the_helpers_keeps_the_ssm_groups(tmp_path, route):
    """Hinted parameters (S4D log_dt / A, Mamba A_log / dt bias / D, Mamba-2 A_log / dt_bias / D) train at
    `config.ssm_lr` without weight decay; weights take the Trainer's weight decay, biases and norms none."""
    model = tiny_model(
        encoder_layer_types=["s4d", "mamba", "mamba2", "gss"],
        ssm_lr=3e-3,
        s4d_d_state=8,
        mamba_d_state=4,
        mamba2_headdim=16,
        mamba2_d_state=8,
        gss_d_state=8,
    )
    args = _arguments(tmp_path, learning_rate=1e-4, weight_decay=0.05)
    if route == "optimizer_cls_and_kwargs":  # Seq2SeqTrainer (5.24) does not take this argument; Trainer does
        helper = optimizer_cls_and_kwargs(model, args)
        trainer = Trainer(model=model, args=args, train_dataset=_examples(), optimizer_cls_and_kwargs=helper)
    elif route == "optimizers from args":
        optimizer_cls, kwargs = optimizer_cls_and_kwargs(model, args)
        optimizer = optimizer_cls(**kwargs)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=_examples(), optimizers=(optimizer, None))
    else:
        optimizer = torch.optim.AdamW(ssm_param_groups(model, weight_decay=args.weight_decay), lr=args.learning_rate)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=_examples(), optimizers=(optimizer, None))
    by_param = _groups_by_parameter(trainer.create_optimizer())

    s4d, mamba, mamba2, gss = (layer.mixer for layer in model.model.encoder.layers)
    for parameter in (
        s4d.ssm.log_dt,
        s4d.ssm.log_A_real,
        s4d.ssm.A_imag,
        mamba.forward_ssm.A_log,
        mamba.backward_ssm.dt_proj.bias,
        mamba2.A_log,
        mamba2.dt_bias,
        gss.ssm.log_dt,
    ):
        assert (by_param[id(parameter)]["lr"], by_param[id(parameter)]["weight_decay"]) == (3e-3, 0.0)
    for parameter in (mamba.forward_ssm.D, mamba2.D):  # no weight decay, the run's learning rate
        assert (by_param[id(parameter)]["lr"], by_param[id(parameter)]["weight_decay"]) == (1e-4, 0.0)
    fc1 = model.model.encoder.layers[0].fc1
    assert (by_param[id(fc1.weight)]["lr"], by_param[id(fc1.weight)]["weight_decay"]) == (1e-4, 0.05)
    assert by_param[id(fc1.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.model.encoder.layers[0].final_layer_norm.weight)]["weight_decay"] == 0.0
    assert len(by_param) == len(list(model.parameters()))  # every parameter once (tied embeddings once)


def test_trainer_default_optimizer_loses_the_ssm_groups(tmp_path):
    """Why the helpers exist: without them the Trainer puts log_dt in its no-decay group at the run's rate."""
    model = tiny_model(encoder_layer_types=["s4d"], ssm_lr=3e-3, s4d_d_state=8)
    trainer = Seq2SeqTrainer(model=model, args=_arguments(tmp_path, learning_rate=1e-4), train_dataset=_examples())
    log_dt = model.model.encoder.layers[0].mixer.ssm.log_dt
    assert _groups_by_parameter(trainer.create_optimizer())[id(log_dt)]["lr"] == 1e-4
