"""Optimizer parameter groups for scrolls_ssm models: one implementation, used by this package's training loop
(`build.build_optimizer`) and offered to users of transformers' `Trainer`.

Three kinds of group:

- weights (tensors of 2 or more dimensions, norms excluded): the run's weight decay;
- biases, norms and other 1-D tensors: no weight decay;
- the parameters a mixer marked with `set_optim_hint` (the state-space dynamics: S4D's dt and A, Mamba's A_log,
  dt bias and D, ...): one group per distinct hint, with the hint's learning rate (`config.ssm_lr`; the run's when
  the hint has none) and weight decay (0).

A learning-rate schedule scales every group's own rate by the same factor, so `ssm_lr` follows the run's warm-up
and decay.

With `Trainer`, either let it build the optimizer `TrainingArguments.optim` names, with these groups:

    trainer = Seq2SeqTrainer(model, args, ..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args))

or build one yourself:

    optimizer = torch.optim.AdamW(ssm_param_groups(model, weight_decay=args.weight_decay), lr=args.learning_rate)
    trainer = Seq2SeqTrainer(model, args, ..., optimizers=(optimizer, None))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .modeling.mixer_base import optim_hints

if TYPE_CHECKING:
    from transformers import TrainingArguments


def ssm_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The model's trainable parameters as optimizer groups: decayed weights (`weight_decay`), undecayed biases and
    norms, and one group per optimizer hint with its own `lr` / `weight_decay`. Empty groups are left out.

    Groups without an `lr` key take the optimizer's learning rate. Every trainable parameter is in exactly one group
    (tied weights once).
    """
    hints = optim_hints(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    hinted: dict[tuple[tuple[str, float], ...], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        hint = hints.get(name)
        if hint is not None:
            hinted.setdefault(tuple(sorted(hint.items())), []).append(parameter)
        elif parameter.dim() < 2 or "norm" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": params, **dict(hint)} for hint, params in hinted.items()]
    return [group for group in groups if group["params"]]


def optimizer_cls_and_kwargs(
    model: nn.Module, args: TrainingArguments
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """For `Trainer(..., optimizer_cls_and_kwargs=...)`: the optimizer `args.optim` names, with `args`'s learning
    rate, betas and epsilon, over `ssm_param_groups(model, args.weight_decay)` (passed as the `params` keyword, which
    the Trainer uses in place of its own two groups).

    Build it from the model you give the Trainer, before the Trainer wraps or shards it.
    """
    from transformers import Trainer
    from transformers.trainer_optimizer import is_optimizer_factory

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    builds_own_groups = {"params", "model", "optimizer_dict"} & set(kwargs)
    if is_optimizer_factory(optimizer_cls) or builds_own_groups:
        raise ValueError(
            f"TrainingArguments.optim={args.optim!r} builds its own parameter groups, so the state-space groups "
            "cannot be added to it. Fix: use a plain optimizer (optim='adamw_torch', 'adamw_torch_fused', 'sgd', "
            "'adafactor', ...), or build one over ssm_param_groups(model, weight_decay) yourself and pass it as "
            "Trainer(optimizers=(optimizer, None))."
        )
    return optimizer_cls, {**kwargs, "params": ssm_param_groups(model, args.weight_decay)}


__all__ = ["optimizer_cls_and_kwargs", "ssm_param_groups"]
