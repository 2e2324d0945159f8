"""Layer-wise attention transfer: teach every swapped mixer what the pretrained attention layer it replaced did.

`swap_encoder` keeps a checkpoint's embeddings, FFNs, norms and decoder, but each new mixer starts from its own random
initialization, so the encoder forgets what its attention layers knew. `transfer_attention` trains every new mixer,
all layers in one pass, to reproduce the output of the attention sublayer it replaced, on the hidden states that enter
that layer in the original model (the attention-transfer stage of LoLCATs, Zhang et al. 2024, for encoders). Only
mixer parameters change; everything `swap_encoder` kept stays bit for bit.

The teacher is the original model as a `ScrollsSSMForConditionalGeneration` with every layer `attention`: its own
query / key / value / output weights, positions tiled up to the student's limit (as LED was made from BART), so it
runs at the student's training length. `attention_window` makes it block-local where full attention does not fit.

Per layer, the loss is the relative squared error over real (non-padding) positions,
`sum |student - teacher|^2 / sum |teacher|^2`: 1.0 is what an all-zero output scores, 0.0 a perfect copy, and every
layer weighs the same whatever the scale of its attention output.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checkpointing import kill_point
from .config import TransferConfig
from .convert import swap_encoder, tile_positions
from .denoising import denoising_batches, denoising_loss, encoder_similarity, group_under_budget
from .modeling.modeling_scrolls_ssm import ScrollsSSMForConditionalGeneration


def attention_teacher(
    base: PreTrainedModel | str | os.PathLike,
    student: ScrollsSSMForConditionalGeneration,
    attention_window: int | None = None,
) -> ScrollsSSMForConditionalGeneration:
    """The original checkpoint `base` (BART, LED or T5 family, a model or a path / Hub id) with every encoder layer
    `attention`, at the student's length limit, in eval mode and without gradients."""
    layers = ["attention"] * len(student.config.encoder_layer_types)
    teacher = swap_encoder(
        base, layers, max_source_positions=student.config.max_source_positions, attention_window=attention_window
    )
    return teacher.eval().requires_grad_(False)


def reuse_attention_weights(
    student: ScrollsSSMForConditionalGeneration, teacher: ScrollsSSMForConditionalGeneration
) -> list[int]:
    """Initialize every `mamba2` and `mamba` layer of the student from the attention it replaces, as "The Mamba in the
    Llama" (Wang et al. 2024) does: the SSM input x from the value projection, B from the key, C from the query, and
    the output projection from the attention's output projection. A selective SSM computes
    y_t = sum_s decay(t, s) (C_t . B_s) x_s, attention's form with a decay in place of the softmax, so this starts it
    near a linear attention with the pretrained projections. Returns the layers it initialized.

    With `mamba2_ngroups` = the attention's heads and `mamba2_d_state` = its head size, the map is per head: group g
    of Mamba-2 heads takes head g's K, Q and V rows and its block of O. Otherwise, where the sizes differ, the source
    rows are tiled (x has `expand` x d_model rows, B and C have `ngroups * d_state`, the first heads' rows), and only
    the first d_model input channels of the output projection are used (the rest start at zero).
    Biases are dropped (the mixers' projections have none); the gate z, the convolution, dt, A and D keep
    their own initialization. Mamba-2 reads B and C from the layer input (rows of `in_proj`); Mamba-1 reads them from
    x after its convolution (rows of each direction's `x_proj`), so there they are the least-squares maps from the
    value space, K pinv(V) and Q pinv(V): exact for B = K h when x = V h, approximate after the convolution and SiLU.
    """
    maps = {"mamba2": _reuse_in_mamba2, "mamba": _reuse_in_mamba}
    done = []
    for index in swapped_layers(student):
        kind = student.config.encoder_layer_types[index]
        if kind in maps:
            with torch.no_grad():
                maps[kind](student.get_encoder().layers[index].mixer, teacher.get_encoder().layers[index].mixer)
            done.append(index)
    return done


class _Projections(NamedTuple):
    """An attention layer's projection weights, whatever its family calls them (BART `q_proj`, T5 `q`)."""

    q: torch.Tensor  # (inner, d_model), inner = heads * head_dim
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # (d_model, inner)
    num_heads: int
    head_dim: int


def _projections(attention: nn.Module) -> _Projections:
    if hasattr(attention, "q_proj"):  # BART / LED
        names, heads, head_dim = ("q_proj", "k_proj", "v_proj", "out_proj"), attention.num_heads, attention.head_dim
    else:  # the T5 family
        names, heads, head_dim = ("q", "k", "v", "o"), attention.n_heads, attention.key_value_proj_dim
    return _Projections(*(getattr(attention, name).weight for name in names), heads, head_dim)


def _reuse_in_mamba2(mixer: nn.Module, attention: nn.Module) -> None:
    attention = _projections(attention)
    d_inner, bc_width = mixer.d_inner, mixer.groups * mixer.d_state
    rows = mixer.in_proj.weight  # (z, x, B, C, dt) stacked
    # B and C: the K and Q rows, tiled to the groups' width. With one group per attention head and d_state = the
    # head size the width is d_model, and group g's rows are exactly head g's.
    rows[2 * d_inner : 2 * d_inner + bc_width] = tile_positions(attention.k, bc_width)
    rows[2 * d_inner + bc_width : 2 * d_inner + 2 * bc_width] = tile_positions(attention.q, bc_width)
    if mixer.groups == attention.num_heads and mixer.d_state == attention.head_dim:
        _reuse_value_and_output_per_head(mixer, attention)
    else:
        rows[d_inner : 2 * d_inner] = tile_positions(attention.v, d_inner)
        _reuse_output(mixer.out_proj, attention)


def _reuse_value_and_output_per_head(mixer: nn.Module, attention: _Projections) -> None:
    """One group of Mamba-2 heads per attention head g: each head of group g reads head g's V rows as x (tiled to
    the head size), and `out_proj` gives each of them head g's block of O, divided by the heads per group (their
    mean)."""
    head, per_group = attention.head_dim, mixer.heads // mixer.groups
    group_width = per_group * mixer.head_dim  # the x rows (and out_proj columns) of one group's heads
    rows = mixer.in_proj.weight
    mixer.out_proj.weight.zero_()
    for g in range(mixer.groups):
        value = attention.v[g * head : (g + 1) * head]
        start = mixer.d_inner + g * group_width
        rows[start : start + group_width] = torch.cat([tile_positions(value, mixer.head_dim)] * per_group)
        output = attention.o[:, g * head : (g + 1) * head] / per_group
        columns = mixer.out_proj.weight[:, g * group_width : (g + 1) * group_width]
        columns.copy_(torch.cat([tile_positions(output.T, mixer.head_dim).T] * per_group, dim=1))


def _reuse_in_mamba(mixer: nn.Module, attention: nn.Module) -> None:
    attention = _projections(attention)
    d_inner = mixer.out_proj.weight.shape[1]
    value = tile_positions(attention.v, d_inner)  # (d_inner, d_model)
    mixer.in_proj.weight[:d_inner] = value  # (x, z) stacked
    from_value = torch.linalg.pinv(value.double())  # (d_model, d_inner): x -> the layer input it came from
    for direction in (mixer.forward_ssm, mixer.backward_ssm):
        rank, d_state = direction.dt_rank, direction.d_state
        rows = direction.x_proj.weight  # (dt, B, C) stacked, each reading x
        for offset, source in ((rank, attention.k), (rank + d_state, attention.q)):
            rows[offset : offset + d_state] = (tile_positions(source, d_state).double() @ from_value).to(rows.dtype)
    _reuse_output(mixer.out_proj, attention)


def _reuse_output(out_proj: nn.Linear, attention: _Projections) -> None:
    inner = attention.o.shape[1]  # the attention's heads * head size (d_model, except in a few T5 sizes)
    out_proj.weight.zero_()
    out_proj.weight[:, :inner] = attention.o[:, : out_proj.weight.shape[1]]


def swapped_layers(student: ScrollsSSMForConditionalGeneration) -> list[int]:
    """The encoder layers whose mixer is not attention: the ones transfer trains."""
    return [index for index, kind in enumerate(student.config.encoder_layer_types) if kind != "attention"]


def _squared_sums(
    prediction: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of |prediction - target|^2, sum of |target|^2) over real positions.
    prediction, target: (batch, seq, d); attention_mask: (batch, seq), 1 = token."""
    mask = attention_mask.to(target.dtype).unsqueeze(-1)
    return ((prediction - target) ** 2 * mask).sum(), (target**2 * mask).sum()


def relative_error(prediction: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sum over real positions of |prediction - target|^2, divided by the same sum of |target|^2.
    prediction, target: (batch, seq, d); attention_mask: (batch, seq), 1 = token."""
    error, norm = _squared_sums(prediction, target, attention_mask)
    return error / norm.clamp_min(torch.finfo(target.dtype).tiny)


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Unlabeled documents from files: every row's `input` of a SCROLLS-format `.jsonl` file (a task's training
    inputs), or the whole text of any other file as one document."""
    documents: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"transfer data {path}: no such file. Pass SCROLLS .jsonl files or text files.")
        if path.suffix != ".jsonl":
            documents.append(path.read_text(encoding="utf-8"))
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict) or not isinstance(row.get("input"), str):
                raise ValueError(
                    f"{path}, line {number}: no string field 'input'. Transfer reads SCROLLS rows "
                    '({"id", "pid", "input", "output"}); pass plain text as a .txt file.'
                )
            documents.append(row["input"])
    return documents


def text_batches(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int, max_tokens: int
) -> list[dict[str, torch.Tensor]]:
    """Unlabeled documents as encoder batches: tokenized (cut to `max_length` tokens), sorted by length and grouped
    so that a batch holds at most `max_tokens` tokens, padding included."""
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts if text.strip()]
    if not encoded:
        raise ValueError("transfer needs at least one non-empty document.")
    batches = group_under_budget(encoded, len, max_tokens)
    return [dict(tokenizer.pad({"input_ids": batch}, return_tensors="pt")) for batch in batches]


class _Capture:
    """Forward hooks on the teacher's mixers of the given layers: what went in and what came out, per layer."""

    def __init__(self, teacher: ScrollsSSMForConditionalGeneration, layers: Sequence[int]):
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        blocks = teacher.get_encoder().layers
        self.handles = [blocks[index].mixer.register_forward_hook(self._hook(index)) for index in layers]

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> None:
            # T5-family attention modules return (output, position bias, ...): the output comes first.
            output = output[0] if isinstance(output, tuple) else output
            self.records[index] = (inputs[0].detach(), output.detach())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _teacher_pass(teacher, capture: _Capture, batch: dict[str, torch.Tensor]) -> dict[int, tuple]:
    capture.records.clear()
    teacher.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return dict(capture.records)


def layer_errors(
    student: ScrollsSSMForConditionalGeneration,
    teacher: ScrollsSSMForConditionalGeneration,
    batches: Sequence[dict[str, torch.Tensor]],
) -> dict[int, float]:
    """Per swapped layer, the relative error of the student's mixer against the teacher's attention over `batches`
    (token-weighted: the sums run over every real position of every batch)."""
    layers = swapped_layers(student)
    capture = _Capture(teacher, layers)
    errors = dict.fromkeys(layers, 0.0)
    norms = dict.fromkeys(layers, 0.0)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                device_batch = {key: value.to(student.device) for key, value in batch.items()}
                for index, (hidden, target) in _teacher_pass(teacher, capture, device_batch).items():
                    mask = device_batch["attention_mask"]
                    error, norm = _squared_sums(student.get_encoder().layers[index].mixer(hidden, mask), target, mask)
                    errors[index] += float(error)
                    norms[index] += float(norm)
    finally:
        capture.remove()
        student.train(was_training)
    return {index: errors[index] / max(norms[index], torch.finfo(torch.float32).tiny) for index in layers}


def transfer_attention(
    student: ScrollsSSMForConditionalGeneration,
    teacher: ScrollsSSMForConditionalGeneration,
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every_steps: int | None = None,
    batches_per_step: int | None = None,
) -> list[dict[str, float]]:
    """Train the student's swapped mixers, all layers in one pass, to reproduce the teacher's attention outputs.

    Args:
        student: the swapped model (e.g. from `swap_encoder`); only the mixers of its non-attention layers train.
        teacher: the original model with every layer attention, e.g. `attention_teacher(base, student)`.
        batches: encoder batches (`input_ids`, `attention_mask`), e.g. `text_batches(documents, tokenizer, ...)`:
            the user's unlabeled documents, such as a task's training inputs. They are cycled in a shuffled order.
        steps: optimizer steps. learning_rate, weight_decay, max_grad_norm: AdamW and clipping.
        checkpoint, checkpoint_every_steps: a file to save the stage's state to every N steps and at its end; a call
            that finds it resumes from it (see `_optimize`).
        batches_per_step: batches averaged per optimizer step (default: one per process). Under torch.distributed
            (`accelerate launch`), every process calls this with the same arguments and the batches of each step
            are dealt out over them (see `_optimize`).

    Returns the log: one `{"step", "loss", "layer_<i>"}` record per step (relative errors, see the module doc). The
    student is left in training mode with the transferred mixers; nothing else in it changes.
    """
    layers = swapped_layers(student)
    if not layers:
        raise ValueError(
            "the student has no swapped layer to transfer: every entry of encoder_layer_types is 'attention'."
        )
    blocks = student.get_encoder().layers
    capture = _Capture(teacher, layers)
    student.train()

    def step_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["attention_mask"]
        errors = {
            index: relative_error(blocks[index].mixer(hidden, mask), target, mask)
            for index, (hidden, target) in _teacher_pass(teacher, capture, batch).items()
        }
        return sum(errors.values()) / len(layers), {f"layer_{i}": float(e.detach()) for i, e in errors.items()}

    try:
        return _optimize(
            student,
            [param for index in layers for param in blocks[index].mixer.parameters()],
            batches,
            steps,
            step_loss,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            seed=seed,
            description="attention transfer" if progress else None,
            checkpoint=checkpoint,
            checkpoint_every_steps=checkpoint_every_steps,
            batches_per_step=batches_per_step,
        )
    finally:
        capture.remove()


DISTILL_PARAMETERS = ("mixers", "encoder", "all")


def distill_outputs(
    student: ScrollsSSMForConditionalGeneration,
    teacher: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float = 1e-4,
    train: str = "mixers",
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every_steps: int | None = None,
    batches_per_step: int | None = None,
) -> list[dict[str, float]]:
    """The end-to-end stage after `transfer_attention`: the student's next-token distributions learn the original
    model's, KL(teacher || student) per target token, on `batches` with `labels` (e.g. `denoising_batches` of the
    user's documents: what a BART-family checkpoint was pretrained on). Keep the inputs within the original's
    position limit, where the teacher is the checkpoint itself.

    train: which parameters learn: "mixers" (the swapped layers' mixers; everything else stays bit for bit),
    "encoder" (the whole encoder) or "all". temperature: both distributions are softened by it (the loss is scaled
    by its square, as usual). checkpoint, checkpoint_every_steps, batches_per_step: as for `transfer_attention`.
    Returns one `{"step", "loss"}` record per step (mean KL per target token, nats).
    """
    if train not in DISTILL_PARAMETERS:
        raise ValueError(f"train={train!r}: choose one of {', '.join(DISTILL_PARAMETERS)}.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0.")
    if not batches or "labels" not in batches[0]:
        raise ValueError("distillation needs batches with labels, e.g. from scrolls_ssm.denoising_batches.")
    if train == "mixers":
        blocks = student.get_encoder().layers
        parameters = [param for index in swapped_layers(student) for param in blocks[index].mixer.parameters()]
    else:
        parameters = list((student.get_encoder() if train == "encoder" else student).parameters())
    if not parameters:
        raise ValueError("the student has no swapped layer to distill into: pass train='encoder' or 'all'.")
    teacher.eval()
    student.train()

    def step_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            target = torch.log_softmax(teacher(**batch).logits.float() / temperature, dim=-1)
        prediction = torch.log_softmax(student(**batch).logits.float() / temperature, dim=-1)
        per_token = (target.exp() * (target - prediction)).sum(-1)
        real = batch["labels"] != -100
        return per_token[real].mean() * temperature**2, {}

    return _optimize(
        student,
        parameters,
        batches,
        steps,
        step_loss,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        seed=seed,
        description="output distillation" if progress else None,
        checkpoint=checkpoint,
        checkpoint_every_steps=checkpoint_every_steps,
        batches_per_step=batches_per_step,
    )


def _optimize(
    model: nn.Module,
    parameters: list[nn.Parameter],
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    step_loss,
    learning_rate: float,
    weight_decay: float,
    max_grad_norm: float | None,
    seed: int,
    description: str | None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every_steps: int | None = None,
    batches_per_step: int | None = None,
) -> list[dict[str, float]]:
    """AdamW on `parameters` for `steps` steps over `batches` (cycled, a new shuffled order each round, fixed by
    `seed`); `step_loss(batch)` returns the loss and extra values to log. Returns the per-step log.

    Each step averages the gradients of `batches_per_step` batches (default: one per process). Under
    torch.distributed (e.g. `accelerate launch`), every process calls this with the same arguments: the batches of a
    step are dealt out over the processes, gradients and logged values are summed across them, and every process
    starts from the first one's parameters, so all end with the same ones. A one-process call with
    `batches_per_step=N` computes what N processes do, up to float rounding.

    With `checkpoint` (a file path), the parameters, optimizer, RNG and log are saved there atomically (by the first
    process) every `checkpoint_every_steps` steps and at the end, and a call that finds the file continues from it:
    the same arguments give the same result, interrupted or not (a finished stage returns at once)."""
    rank, world = _process_group()
    per_step = world if batches_per_step is None else batches_per_step
    if steps < 1:
        raise ValueError(f"steps={steps}: at least one optimizer step is needed.")
    if per_step < world:
        raise ValueError(
            f"batches_per_step={batches_per_step}: each of the {world} processes needs at least one batch per step. "
            f"Fix: batches_per_step >= {world}, or leave it unset (one per process)."
        )
    if not batches:
        raise ValueError("at least one batch of documents is needed.")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    order = _cycle(len(batches), torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    log: list[dict[str, float]] = []
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        log = _load_stage(path, parameters, optimizer, steps, per_step)
        for _ in range(len(log) * per_step):  # the batches those steps used
            next(order)
    elif world > 1:
        with torch.no_grad():
            for param in parameters:
                torch.distributed.broadcast(param.data, src=0)
    progress = tqdm(total=steps, initial=len(log), desc=description, disable=description is None or rank != 0)
    for step in range(len(log) + 1, steps + 1):
        chosen = [next(order) for _ in range(per_step)]
        totals: dict[str, float] = {}
        for index in chosen[rank::world]:
            batch = {key: value.to(device) for key, value in batches[index].items()}
            loss, values = step_loss(batch)
            (loss / per_step).backward()
            for name, value in {**values, "loss": float(loss.detach())}.items():
                totals[name] = totals.get(name, 0.0) + value / per_step
        if world > 1:
            totals = _sum_over_processes(parameters, totals, device)
        if max_grad_norm:
            nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step, **totals})  # "loss" comes last either way ("layer_<i>" sorts before it)
        progress.update(1)
        if path is not None and (step == steps or (checkpoint_every_steps and step % checkpoint_every_steps == 0)):
            if rank == 0:
                _save_stage(path, parameters, optimizer, log, per_step)
            kill_point(f"{path.stem}-saved", step)
    progress.close()
    return log


def _process_group() -> tuple[int, int]:
    """(rank, number of processes) of the torch.distributed group this process is in; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sum_over_processes(
    parameters: list[nn.Parameter], totals: dict[str, float], device: torch.device
) -> dict[str, float]:
    """Sum the gradients (a parameter that got none in this process adds zeros) and the logged values over every
    process; the values come back in the same order of names on every process."""
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
    names = sorted(totals)
    summed = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    return dict(zip(names, summed.tolist(), strict=True))


def _save_stage(
    path: Path, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer, log: list, batches_per_step: int
) -> None:
    state = {
        "parameters": [param.detach().cpu() for param in parameters],
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "log": log,
        "batches_per_step": batches_per_step,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    torch.save(state, staging)
    os.replace(staging, path)  # a kill leaves the previous checkpoint whole


def _load_stage(
    path: Path, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer, steps: int, batches_per_step: int
) -> list:
    """Restore a `_save_stage` file into `parameters` and `optimizer`; returns its log."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    shapes = [tuple(tensor.shape) for tensor in state["parameters"]]
    if shapes != [tuple(param.shape) for param in parameters] or len(state["log"]) > steps:
        raise ValueError(
            f"{path} holds the state of another stage ({len(shapes)} tensors, {len(state['log'])} steps), not of this "
            f"one ({len(parameters)} tensors, {steps} steps). Fix: delete it to start the stage over, or use the "
            "settings it was written with."
        )
    saved_per_step = state.get("batches_per_step", 1)
    if saved_per_step != batches_per_step:
        raise ValueError(
            f"{path} was written with {saved_per_step} batch(es) per step and this run takes {batches_per_step} (one "
            "per process unless batches_per_step is set). Fix: resume with as many processes as wrote it, set "
            f"batches_per_step={saved_per_step}, or delete the file to start the stage over."
        )
    with torch.no_grad():
        for param, saved in zip(parameters, state["parameters"], strict=True):
            param.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["log"]


def _cycle(count: int, generator: torch.Generator) -> Iterator[int]:
    """Batch indices forever: every batch once per round, each round in a new shuffled order."""
    for _ in itertools.count():
        yield from torch.randperm(count, generator=generator).tolist()


def original_position_limit(base: PreTrainedModel | str | os.PathLike) -> int:
    """The longest input the checkpoint `base` was trained on: its encoder's learned positions."""
    from transformers import AutoConfig

    from .build import encoder_length_limit

    # BART: max_position_embeddings, LED: max_encoder_position_embeddings, the T5 family: no table (unbounded).
    return encoder_length_limit(base.config if isinstance(base, PreTrainedModel) else AutoConfig.from_pretrained(base))


def run_transfer(
    student: ScrollsSSMForConditionalGeneration,
    base: PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    settings: TransferConfig,
    max_length: int,
    max_tokens_per_batch: int,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
    report_batches: int = 4,
    progress: bool = True,
) -> dict:
    """The whole conversion stage that `settings` asks for, on `documents`, in place on `student` (swapped from
    `base`): weight reuse, layer-wise attention transfer, then output distillation. Returns a report: per swapped
    layer the relative error and the encoder-output cosine similarity to the original before and after, on the first
    `report_batches` batches, and each stage's log. `work_dir` keeps each stage's checkpoint
    (`attention_transfer.pt`, `output_distillation.pt`): a call that finds them resumes from them.
    Used by `scrolls-ssm convert` and by the recipe stage `transfer:` (train.py)."""
    device = next(student.parameters()).device
    teacher = attention_teacher(base, student, attention_window=settings.teacher_window).to(device)
    work = Path(work_dir) if work_dir is not None else None
    report: dict = {"base": str(getattr(base, "name_or_path", base)), "documents": len(documents)}
    if settings.reuse_weights:
        report["reused_weights_in_layers"] = reuse_attention_weights(student, teacher)
        if not report["reused_weights_in_layers"]:
            raise ValueError(
                f"reuse_weights: the layout {student.config.encoder_layer_types} has no mamba or mamba2 layer, the "
                "only kinds with a weight map. Fix: turn weight reuse off or swap some layers to mamba or mamba2."
            )
    batches = text_batches(documents, tokenizer, max_length, max_tokens_per_batch)
    probe = batches[:report_batches]
    report["relative_error_before"] = layer_errors(student, teacher, probe)
    report["encoder_cosine_before"] = encoder_similarity(student, teacher, probe)
    if settings.steps:
        log = transfer_attention(
            student,
            teacher,
            batches,
            settings.steps,
            learning_rate=settings.learning_rate,
            seed=seed,
            progress=progress,
            checkpoint=work / "attention_transfer.pt" if work else None,
            checkpoint_every_steps=settings.checkpoint_every_steps,
            batches_per_step=settings.batches_per_step,
        )
        report["transfer"] = {"steps": settings.steps, "learning_rate": settings.learning_rate, "log": log}
    if settings.distill_steps:
        decoder_limit = getattr(student.config, "max_position_embeddings", None) or sys.maxsize  # T5: none
        length = min(max_length, original_position_limit(base), decoder_limit)
        distill = denoising_batches(documents, tokenizer, length, max_tokens_per_batch, seed=seed)
        loss_before = denoising_loss(student, distill[:report_batches])
        log = distill_outputs(
            student,
            teacher,
            distill,
            settings.distill_steps,
            learning_rate=settings.distill_learning_rate,
            train=settings.distill_train,
            seed=seed,
            progress=progress,
            checkpoint=work / "output_distillation.pt" if work else None,
            checkpoint_every_steps=settings.checkpoint_every_steps,
            batches_per_step=settings.batches_per_step,
        )
        report["distillation"] = {
            "steps": settings.distill_steps,
            "learning_rate": settings.distill_learning_rate,
            "train": settings.distill_train,
            "max_length": length,
            "denoising_loss": {
                "original": denoising_loss(teacher, distill[:report_batches]),
                "before": loss_before,
                "after": denoising_loss(student, distill[:report_batches]),
            },
            "log": log,
        }
    report["relative_error_after"] = layer_errors(student, teacher, probe)
    report["encoder_cosine_after"] = encoder_similarity(student, teacher, probe)
    return report
