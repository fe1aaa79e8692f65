"""One optimizer step on the DeepSpeed engine: forward, loss (next-token loss plus the run's loss terms),
backward, step, over the gradient-accumulation micro-batches. The loop around it lives in
:mod:`connito.training.trainer`.

Shapes: B micro-batch, T sequence length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from connito.training.batches import PackedSplit, StepSampler
from connito.training.callbacks import LossTerm, MicroBatch, check_loss_value
from connito.training.losses import token_cross_entropy


def micro_batch(split: PackedSplit, sampler: StepSampler, step: int, micro_step: int, device) -> MicroBatch:
    rows = sampler.rows(step, micro_step)
    return MicroBatch(split.input_ids_NT[rows].to(device), split.domain_ids_NT[rows], step, micro_step)


def forward_loss(
    engine, batch: MicroBatch, loss_terms: Sequence[LossTerm], task_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, lm_loss, {term name: value})`` of one micro-batch: ``task_weight * lm_loss + sum(coef * value)``
    (a weight of 1 leaves ``lm_loss`` bit for bit)."""
    outputs = engine(input_ids=batch.input_ids_BT)
    lm_loss = token_cross_entropy(outputs.logits, batch.input_ids_BT).mean()
    loss, values = (lm_loss if task_weight == 1.0 else task_weight * lm_loss), {}
    for term in loss_terms:
        value = term(batch, outputs)
        if value is None:
            continue
        values[term.name] = check_loss_value(term, value)
        loss = loss + term.coef * value
    return loss, lm_loss, values


def train_step(
    engine,
    split: PackedSplit,
    sampler: StepSampler,
    step: int,
    loss_terms: Sequence[LossTerm],
    device: torch.device,
    before_forward: Callable[[MicroBatch], float] | None = None,
    clip: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run optimizer step ``step`` (0-based): every micro-batch goes through ``engine.backward`` and
    ``engine.step``; DeepSpeed applies the update at the accumulation boundary. Returns the step's mean losses on
    this rank: ``loss`` (next-token, unweighted) and each loss term that gave a value, by name.

    ``before_forward(batch)``, when given, runs before each micro-batch's forward and returns the weight of the
    next-token loss in that micro-batch's loss (the trainer's: callbacks' ``on_micro_batch``, then
    ``trainer.task_loss_weight``).

    ``clip()``, when given, runs after the last micro-batch's backward (gradients reduced) and before the step that
    applies the update: it clips the gradients and returns their global norm, returned as ``grad_norm`` (Connito's
    own clipping where DeepSpeed's is wrong: :mod:`connito.parallel.grad_clip`)."""
    sums: dict[str, float] = {"loss": 0.0}
    grad_norm = None
    for micro_step in range(sampler.grad_accum):
        batch = micro_batch(split, sampler, step, micro_step, device)
        task_weight = 1.0 if before_forward is None else before_forward(batch)
        loss, lm_loss, values = forward_loss(engine, batch, loss_terms, task_weight)
        engine.backward(loss)
        if clip is not None and micro_step == sampler.grad_accum - 1:
            grad_norm = float(clip())
        engine.step()
        sums["loss"] += lm_loss.item()
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value.item()
    means = {name: total / sampler.grad_accum for name, total in sums.items()}
    if grad_norm is not None:
        means["grad_norm"] = grad_norm
    return means
