"""One optimizer step on the DeepSpeed engine: forward, loss (next-token loss plus the run's loss terms),
backward, step, over the gradient-accumulation micro-batches. The loop around it lives in
:mod:`connito.training.trainer`.

Shapes: B micro-batch, T sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from connito.training.batches import PackedSplit, StepSampler
from connito.training.callbacks import LossTerm, MicroBatch, check_loss_value
from connito.training.losses import token_cross_entropy


def micro_batch(split: PackedSplit, sampler: StepSampler, step: int, micro_step: int, device) -> MicroBatch:
    rows = sampler.rows(step, micro_step)
    return MicroBatch(split.input_ids_NT[rows].to(device), split.domain_ids_NT[rows], step, micro_step)


def forward_loss(
    engine, batch: MicroBatch, loss_terms: Sequence[LossTerm]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, lm_loss, {term name: value})`` of one micro-batch: ``lm_loss + sum(coef * value)``."""
    outputs = engine(input_ids=batch.input_ids_BT)
    lm_loss = token_cross_entropy(outputs.logits, batch.input_ids_BT).mean()
    loss, values = lm_loss, {}
    for term in loss_terms:
        value = term(batch, outputs)
        if value is None:
            continue
        values[term.name] = check_loss_value(term, value)
        loss = loss + term.coef * value
    return loss, lm_loss, values


def train_step(
    engine, split: PackedSplit, sampler: StepSampler, step: int, loss_terms: Sequence[LossTerm], device: torch.device
) -> dict[str, float]:
    """Run optimizer step ``step`` (0-based): every micro-batch goes through ``engine.backward`` and
    ``engine.step``; DeepSpeed applies the update at the accumulation boundary. Returns the step's mean losses on
    this rank: ``loss`` (next-token) and each loss term that gave a value, by name."""
    sums: dict[str, float] = {"loss": 0.0}
    for micro_step in range(sampler.grad_accum):
        batch = micro_batch(split, sampler, step, micro_step, device)
        loss, lm_loss, values = forward_loss(engine, batch, loss_terms)
        engine.backward(loss)
        engine.step()
        sums["loss"] += lm_loss.item()
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value.item()
    return {name: total / sampler.grad_accum for name, total in sums.items()}
