"""One optimizer step on the DeepSpeed engine: forward, loss, backward, step, over the gradient-accumulation
micro-batches. The loop around it (logging, evaluation, checkpoints) lives in :mod:`connito.training.trainer`.

Shapes: B micro-batch, T sequence length.
"""

from dataclasses import dataclass

import torch

from connito.parallel.router_aux import aux_loss as router_aux_loss
from connito.training.batches import PackedSplit, StepSampler
from connito.training.losses import token_cross_entropy


@dataclass(frozen=True)
class StepLosses:
    lm: float
    """Mean next-token loss over the step's micro-batches on this rank."""
    aux: float | None
    """Mean load-balancing loss, or None when the family computes none."""


def train_step(
    engine, split: PackedSplit, sampler: StepSampler, step: int, aux_loss_coef: float, device: torch.device
) -> StepLosses:
    """Run optimizer step ``step`` (0-based): every micro-batch goes through ``engine.backward`` and
    ``engine.step``; DeepSpeed applies the update at the accumulation boundary."""
    lm_sum, aux_sum, has_aux = 0.0, 0.0, False
    for micro_step in range(sampler.grad_accum):
        input_ids_BT = split.input_ids_NT[sampler.rows(step, micro_step)].to(device)
        outputs = engine(input_ids=input_ids_BT)
        lm_loss = token_cross_entropy(outputs.logits, input_ids_BT).mean()
        aux_loss = router_aux_loss(engine.module, outputs)  # outputs.aux_loss, or Connito's (AutoEP custom pattern)
        loss = lm_loss if aux_loss is None else lm_loss + aux_loss_coef * aux_loss
        engine.backward(loss)
        engine.step()
        lm_sum += lm_loss.item()
        if aux_loss is not None:
            aux_sum, has_aux = aux_sum + aux_loss.item(), True
    return StepLosses(lm_sum / sampler.grad_accum, aux_sum / sampler.grad_accum if has_aux else None)
