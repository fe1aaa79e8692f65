"""A test callback that uses every trainer event a method needs: registered by name (a run imports this module
through ``plugins='[tests.training.probe_callback]'``), it adds a loss term, attaches a gradient hook once the
engine is built (the AutoEP router under expert parallelism), acts after every optimizer step, and keeps state
that a checkpoint saves and a resume restores. It logs that state as metrics, so a loss-curve comparison covers it.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from connito.experts import ExpertView
from connito.training.callbacks import Callback, LossTerm, register_callback


class RouterL2(LossTerm):
    """``sum(w^2)`` over every MoE layer's router weight, read through the expert view (any layout)."""

    name = "probe_l2"

    def __init__(self, view: ExpertView, coef: float):
        self.view, self.coef = view, coef

    def __call__(self, batch, outputs) -> torch.Tensor:
        return sum(self.view.router_weight(layer).pow(2).sum() for layer in self.view.moe_layers)


@register_callback("probe")
class ProbeCallback(Callback):
    def __init__(self, coef: float = 0.01):
        self.coef = coef
        self.steps = 0
        self.hook_calls = 0
        self.term_sum = 0.0

    def on_engine_built(self, trainer) -> None:
        view = ExpertView(trainer.engine.module)
        self.term = RouterL2(view, self.coef)
        trainer.add_loss_term(self.term)
        layer = view.moe_layers[0]
        weight = view.router_weight(layer)
        weight.register_hook(self._count)
        if trainer.info.is_main:
            hooked = {"block": type(view.block(layer)).__name__, "ep_size": view.ep_size}
            (trainer.run_dir / "probe_hooked.json").write_text(json.dumps(hooked))

    def _count(self, grad: torch.Tensor) -> None:
        self.hook_calls += 1

    def on_step_end(self, trainer, losses) -> None:
        value = torch.tensor(losses["probe_l2"], dtype=torch.float64)
        if dist.is_initialized():  # callback state is the same on every rank
            dist.all_reduce(value)
            value /= dist.get_world_size()
        self.steps += 1
        self.term_sum += value.item()

    def on_metrics(self, trainer, metrics) -> None:
        metrics.update(
            {"probe/steps": self.steps, "probe/hook_calls": self.hook_calls, "probe/term_sum": self.term_sum}
        )

    def state_dict(self) -> dict:
        return {"steps": self.steps, "hook_calls": self.hook_calls, "term_sum": self.term_sum}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.hook_calls, self.term_sum = state["steps"], state["hook_calls"], state["term_sum"]
