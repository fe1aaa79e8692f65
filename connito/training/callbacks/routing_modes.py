"""``callbacks.expert_choice`` and ``callbacks.expert_threshold``: train with another routing than the family's top-k.

::

    connito train +callbacks.expert_choice.capacity_factor=1.0
    connito train +callbacks.expert_choice={} +callbacks.expert_choice.predictor_inference=half
    connito train +callbacks.expert_threshold.capacity_factor=1.0 +callbacks.expert_threshold.decay=0.9

Options (:class:`connito.routing.routing_modes.RoutingOptions`): ``capacity_factor`` (1.0: top-k's compute),
``decay`` (of the moving capacity thresholds), and for Expert Choice ``predictor_inference`` (``calibrated``,
``half`` or ``top_k``) and ``predictor_coef`` (weight of the predictor's loss term, 1.0).

Events:

* ``on_model_built``: the mode goes on every MoE block of the transformers model (:mod:`connito.routing.routing_modes`)
  before ``deepspeed.initialize``, so the optimizer trains Expert Choice's predictor and the engine's checkpoints
  carry the predictor and every moving threshold (model parameters and buffers: a resume routes as the run did);
* ``on_engine_built``: Expert Choice adds the loss term ``route_predictor`` (the predictor's binary cross-entropy
  against the selection, on detached inputs: it trains the predictor only; logged as ``train/route_predictor``,
  never part of ``train/loss``);
* ``on_step_end``: under data parallelism the ranks' thresholds are averaged (a collective);
* ``on_metrics``: ``routing/max_load`` (worst expert's tokens over its capacity: 1 for Expert Choice),
  ``routing/experts_per_token``, ``routing/unrouted_tokens``, ``routing/predictor_agreement``;
* ``on_export``: the routing modules' entries leave the HF export's state dict (plain transformers loads it, and
  routes it top-k) and go beside it as ``routing_state.safetensors`` + ``routing_state.json``, which
  :func:`connito.routing.routing_export.load_routing_mode` puts back (:mod:`connito.routing.routing_export`).

Validation runs in eval mode, so a run's validation loss is measured on the causal route (Expert Choice: the
predictor's). The family's load-balancing loss (``model.aux_loss_coef``) still applies to the router logits as
transformers computes it; Expert Choice needs none (set ``model.aux_loss_coef=0``), threshold routing may keep it.

Refused with the fix: ``parallel.ep_size > 1`` (AutoEP's layers route and dispatch top-k in one fused all-to-all;
a per-expert capacity chosen across the batch has no seam there), ZeRO-3 (the modes read the stacked expert weights
directly, which ZeRO-3 partitions), two routing modes at once, bad options. The options are saved with every
checkpoint; resuming with other options is refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from connito.routing.routing_export import write_routing_state
from connito.routing.routing_modes import RoutingModes, RoutingOptions
from connito.training.callbacks.base import Callback, CallbackError, LossTerm, MicroBatch

if TYPE_CHECKING:
    from connito.training.trainer import Trainer

log = logging.getLogger("connito.training")


class PredictorTerm(LossTerm):
    """The route predictors' binary cross-entropy of this micro-batch's forward (mean over MoE layers)."""

    name = "route_predictor"

    def __init__(self, routing: RoutingModes, coef: float):
        self.routing, self.coef = routing, coef

    def __call__(self, batch: MicroBatch, outputs) -> torch.Tensor | None:
        return self.routing.predictor_loss()


class RoutingModeCallback(Callback):
    """The shared events of the routing-mode callbacks; subclasses name the mode."""

    mode = ""

    def __init__(self, **options):
        try:
            self.options = RoutingOptions(self.mode, **options)
        except ValueError as err:
            raise CallbackError(f"callbacks.{err}") from None
        self.routing: RoutingModes | None = None

    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        cfg, where = trainer.cfg, f"callbacks.{self.mode}"
        if cfg.parallel.ep_size != 1:
            raise CallbackError(
                f"{where} needs parallel.ep_size=1, not {cfg.parallel.ep_size}: DeepSpeed AutoEP's layers route and "
                "dispatch tokens top-k in one fused all-to-all, with no seam for a per-expert capacity chosen across "
                "the batch. Use parallel.ep_size=1 (ZeRO 1/2, engine=zero2, still spreads the optimizer state)"
            )
        if cfg.engine.zero_stage == 3:
            raise CallbackError(
                f"{where} reads the stacked expert weights directly, which ZeRO-3 partitions: use engine.zero_stage "
                "0, 1 or 2"
            )
        others = [c.name for c in trainer.callbacks if isinstance(c, RoutingModeCallback) and c is not self]
        if others:
            raise CallbackError(f"{where}: one routing mode per run; remove callbacks.{others[0]}")
        try:
            self.routing = RoutingModes(model, self.options)
        except ValueError as err:
            raise CallbackError(f"{where}: {err}") from None
        if trainer.info.is_main:
            log.info("%s on MoE layers %s (%s)", self.mode, self.routing.view.moe_layers, self.options.to_dict())

    def on_engine_built(self, trainer: Trainer) -> None:
        pass

    def on_micro_batch(self, trainer: Trainer, batch: MicroBatch) -> None:
        self.routing.clear_pending()  # nothing left from a forward no loss term consumed

    def on_step_end(self, trainer: Trainer, losses) -> None:
        self.routing.sync_(trainer.info.world_size)

    def on_metrics(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        metrics.update(self.routing.metrics())

    def on_export(self, trainer: Trainer, state_dict: dict[str, torch.Tensor]) -> None:
        self.routing.strip(state_dict)
        write_routing_state(trainer.result.export_dir, self.routing)
        log.info(
            "%s: the HF export routes top-k under plain transformers; the trained route is in %s (load it with "
            "connito.routing.routing_export.load_routing_mode)", self.mode, trainer.result.export_dir,
        )  # fmt: skip

    def state_dict(self) -> dict:
        return {"options": self.options.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("options")
        if saved is not None and saved != self.options.to_dict():
            raise CallbackError(
                f"callbacks.{self.mode}: the checkpoint was trained with {saved}, this run asks for "
                f"{self.options.to_dict()}; resume with the same options (or start a new run.name)"
            )


class ExpertChoice(RoutingModeCallback):
    """Expert Choice in training, a trained predictor's causal route at inference
    (:mod:`connito.routing.expert_choice`)."""

    mode = "expert_choice"

    def __init__(self, predictor_coef: float = 1.0, **options):
        super().__init__(**options)
        if isinstance(predictor_coef, bool) or not isinstance(predictor_coef, int | float) or predictor_coef < 0:
            raise CallbackError(f"callbacks.expert_choice.predictor_coef={predictor_coef!r}: give a number >= 0")
        self.predictor_coef = float(predictor_coef)

    def on_engine_built(self, trainer: Trainer) -> None:
        trainer.add_loss_term(PredictorTerm(self.routing, self.predictor_coef))


class ExpertThreshold(RoutingModeCallback):
    """Expert-threshold routing, causal in training and inference (:mod:`connito.routing.expert_threshold`)."""

    mode = "expert_threshold"

    def __init__(self, **options):
        if "predictor_inference" in options:
            raise CallbackError("callbacks.expert_threshold has no predictor: predictor_inference is expert_choice's")
        super().__init__(**options)
