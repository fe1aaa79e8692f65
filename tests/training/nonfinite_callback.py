"""A test callback that makes one micro-batch's loss non-finite (``plugins='[tests.training.nonfinite_callback]'``,
``+callbacks.nonfinite.at_step=2``): its loss term is ``value * mean(logits)`` on that micro-batch (0 elsewhere),
so the loss and every gradient that reaches the logits become NaN (or inf), as a real blow-up would.

It also keeps, for the test, a copy of the parameters and of the optimizer state (ZeRO 0's torch AdamW) after
every step: ``snapshots[step]`` (``step`` = steps done)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from connito.training.callbacks import Callback, LossTerm, register_callback


class NonFiniteTerm(LossTerm):
    name = "nonfinite"
    coef = 1.0

    def __init__(self, at_step: int, micro_step: int, rank: int, value: float):
        self.at_step, self.micro_step, self.rank, self.value = at_step, micro_step, rank, value

    def __call__(self, batch, outputs) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_initialized() else 0
        hit = batch.step == self.at_step and batch.micro_step == self.micro_step and self.rank in (-1, rank)
        return outputs.logits.float().mean() * (self.value if hit else 0.0)


@register_callback("nonfinite")
class NonFiniteCallback(Callback):
    def __init__(self, at_step: int, micro_step: int = 0, rank: int = -1, value: str = "nan", snapshots: bool = False):
        """``at_step``: the 0-based optimizer step; ``rank``: the rank whose loss goes bad (-1: every rank)."""
        self.term = NonFiniteTerm(at_step, micro_step, rank, float(value))
        self.keep_snapshots = snapshots
        self.snapshots: dict[int, dict] = {}

    def on_engine_built(self, trainer) -> None:
        trainer.add_loss_term(self.term)

    def on_step_end(self, trainer, losses) -> None:
        if not self.keep_snapshots:
            return
        params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
        optimizer = trainer.engine.optimizer
        state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
        self.snapshots[trainer.state.step] = {"params": params, "optimizer": state}
