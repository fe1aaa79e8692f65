"""Routing balance for every family (:mod:`connito.routing.balancing`, megatron-core's functions), chosen by the model
config and attached by the trainer to every run:

* ``model.aux_loss_coef`` on a family transformers computes no balance loss for (DeepSeek-V2, DeepSeek-V3, the
  Residual-MoE preset): DeepSeek-V2's expert-level balance loss (``train/balance_loss``); on the other families
  transformers' own loss (:class:`connito.training.callbacks.builtin.LoadBalancing`);
* ``model.device_aux_loss_coef``: DeepSeek-V2's device-level balance loss (``train/device_balance_loss``) over the
  ``parallel.ep_size`` groups of experts the expert-parallel ranks hold (refused at ep 1, where it is not defined);
* ``model.seq_aux_loss_coef``: DeepSeek-V3's sequence-wise balance loss (``train/seq_balance_loss``);
* ``model.z_loss_coef``: the router z-loss (``train/router_z_loss``), any family;
* ``model.expert_bias_update_rate``: DeepSeek-V3's auxiliary-loss-free balancing. After every optimizer step each
  MoE layer's ``e_score_correction_bias`` (the choice bias the router adds to its scores before top-k, so the
  export carries it and plain transformers routes with it) moves by the rate towards the mean load: the step's
  top-k choices of all micro-batches, summed over every rank (each routes its own tokens, also under expert
  parallelism). The bias is a buffer of the model: checkpoints carry it, a resumed run continues bit for bit.

Each loss is the mean over the MoE layers of the per-layer loss, times its coefficient, on this rank's tokens of the
micro-batch (transformers' loss is a mean over its concatenated layers too). Scores are the family's own: softmax, or
sigmoid normalised per token (``Family.router_scoring``).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from connito.experts import ExpertView
from connito.routing import RouterObserver, RoutingRecord
from connito.routing.balancing import (
    device_balance_loss,
    expert_balance_loss,
    router_z_loss,
    sequence_balance_loss,
    updated_expert_bias,
)
from connito.training.callbacks.base import Callback, CallbackError, LossTerm, MicroBatch

if TYPE_CHECKING:
    from connito.training.trainer import Trainer


class ObservedRouting:
    """The router logits of the model's last forward, per MoE layer, and the step's expert loads."""

    def __init__(self, model: torch.nn.Module, observer: RouterObserver, count_loads: bool):
        self.model = model
        self.records: list[RoutingRecord] = []
        self.count_loads = count_loads
        self.loads_LE: dict[int, torch.Tensor] = {}
        self.num_experts = observer.view.num_experts
        self._subscription = observer.subscribe(self._record)
        self._handle = model.register_forward_pre_hook(self._start)

    def _start(self, module, args) -> None:
        self.records.clear()

    def _record(self, record: RoutingRecord) -> None:
        self.records.append(record)
        if self.count_loads and self.model.training and torch.is_grad_enabled():
            counts_E = torch.bincount(record.topk_ids_TK.reshape(-1), minlength=self.num_experts)
            self.loads_LE[record.layer] = self.loads_LE.get(record.layer, 0) + counts_E.detach().to(torch.float32)

    def remove(self) -> None:
        self._subscription.remove()
        self._handle.remove()


class _ObservedLoss(LossTerm):
    def __init__(self, name: str, coef: float, routing: ObservedRouting, top_k: int, score_function: str):
        self.name, self.coef, self.routing = name, coef, routing
        self.top_k, self.score_function = top_k, score_function

    def layer_loss(self, logits_TE: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch: MicroBatch, outputs) -> torch.Tensor | None:
        records = self.routing.records
        if not records:
            return None
        return torch.stack([self.layer_loss(r.logits_TE.float(), batch) for r in records]).mean()


class ExpertBalanceTerm(_ObservedLoss):
    def layer_loss(self, logits_TE, batch):
        return expert_balance_loss(logits_TE, self.top_k, self.score_function)


class DeviceBalanceTerm(_ObservedLoss):
    def __init__(self, *args, num_devices: int):
        super().__init__(*args)
        self.num_devices = num_devices

    def layer_loss(self, logits_TE, batch):
        return device_balance_loss(logits_TE, self.top_k, self.num_devices, self.score_function)


class SequenceBalanceTerm(_ObservedLoss):
    def layer_loss(self, logits_TE, batch):
        batch_size, seq = batch.input_ids_BT.shape
        return sequence_balance_loss(logits_TE.reshape(batch_size, seq, -1), self.top_k, self.score_function)


class RouterZLossTerm(_ObservedLoss):
    def layer_loss(self, logits_TE, batch):
        return router_z_loss(logits_TE)


class RoutingBalance(Callback):
    """Adds the balance terms and the bias update ``model.*`` asks for; see the module docstring."""

    def __init__(self):
        self.routing: ObservedRouting | None = None
        self.rate = 0.0
        self.biases: dict[int, torch.Tensor] = {}

    def on_engine_built(self, trainer: Trainer) -> None:
        cfg, family = trainer.cfg.model, trainer.family
        expert_coef = 0.0 if family.has_aux_loss else cfg.aux_loss_coef  # transformers' own loss otherwise
        ep_size = trainer.cfg.parallel.ep_size
        if cfg.device_aux_loss_coef > 0 and ep_size < 2:
            raise CallbackError(
                f"model.device_aux_loss_coef={cfg.device_aux_loss_coef}: DeepSeek-V2's device-level balance loss "
                "balances the experts' expert-parallel ranks and is not defined at parallel.ep_size=1; run with "
                "parallel.ep_size>1 or set model.device_aux_loss_coef=0 (model.aux_loss_coef balances the experts)"
            )
        device_term = partial(DeviceBalanceTerm, num_devices=ep_size)
        wanted = {
            "balance_loss": (expert_coef, ExpertBalanceTerm),
            "device_balance_loss": (cfg.device_aux_loss_coef, device_term),
            "seq_balance_loss": (cfg.seq_aux_loss_coef, SequenceBalanceTerm),
            "router_z_loss": (cfg.z_loss_coef, RouterZLossTerm),
        }
        self.rate = cfg.expert_bias_update_rate
        if not family.is_moe or (all(coef <= 0 for coef, _ in wanted.values()) and self.rate <= 0):
            return
        model = trainer.engine.module
        view = ExpertView(model)
        if self.rate > 0:
            missing = [layer for layer, block in view.blocks() if block.choice_bias() is None]
            if missing:
                raise CallbackError(
                    f"model.expert_bias_update_rate={self.rate}: the MoE layers {missing} of this {family.model_type} "
                    "model have no choice bias (e_score_correction_bias) to update; the aux-loss-free bias update is "
                    "DeepSeek-V3's. Set model.expert_bias_update_rate=0 and balance with model.aux_loss_coef"
                )
        # the choice-bias buffers, updated in place after every step (checkpoint loads copy into them in place too)
        self.biases = {layer: block.choice_bias() for layer, block in view.blocks()} if self.rate > 0 else {}
        self.routing = ObservedRouting(model, trainer.router_observer(), count_loads=self.rate > 0)
        for name, (coef, term) in wanted.items():
            if coef > 0:
                trainer.add_loss_term(term(name, coef, self.routing, view.top_k, family.router_scoring))

    def on_step_end(self, trainer: Trainer, losses) -> None:
        if self.routing is None or self.rate <= 0:
            return
        loads, self.routing.loads_LE = self.routing.loads_LE, {}
        for layer, bias_E in self.biases.items():  # every rank runs every layer's collective, in one order
            load_E = loads.get(layer, torch.zeros(bias_E.numel(), dtype=torch.float32)).to(bias_E.device)
            with torch.no_grad():
                bias_E.copy_(updated_expert_bias(load_E, bias_E, self.rate, dist.group.WORLD).to(bias_E.dtype))

    # No on_train_end removal: the trainer's loss terms stay usable after training (a caller may compute one more
    # step's loss with them), and each needs the records of its own forward, which the pre-hook keeps current.
