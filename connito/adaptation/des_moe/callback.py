"""``callbacks.des_moe``: DES-MoE on the one trainer, as events, a loss term, hooks and a gradient mask.

What happens when (``trainer`` events, :mod:`connito.training.callbacks.base`):

* ``on_model_built`` (the transformers model, before the engine): the adaptive routers go on every MoE layer
  (:mod:`.router`), their pretrained weights are copied as the distillation teacher, and everything no phase trains
  is frozen (no gradient, no optimizer state; :func:`connito.training.grad_masks.freeze_untrainable` with the union
  of the phases, :mod:`.phases`);
* ``on_engine_built``: the slice-exact gradient mask of the first phase, the distillation term (:mod:`.distill`),
  the per-token gradient masks (:mod:`.token_masks`) and the routing counter of the expert-domain map
  (:mod:`.domain_map`, fed by the run's router observer);
* ``on_micro_batch``: lambda of this step's progress becomes the distillation term's weight and ``1 - lambda`` the
  trainer's ``task_loss_weight``; the tokens' domains go to the counter and the per-token masks;
* ``on_step_end``: the map is built at the end of the warm-up and refreshed every ``refresh_every`` steps after it
  (rank 0 writes it to ``<run>/des_moe_map.json``); the mask follows the phase of the next step and the map's
  experts (:meth:`connito.training.grad_masks.GradientMask.set_trainable`: experts that leave the set lose their
  first moment, so neither weight decay nor stale momentum moves them);
* ``on_export`` (rank 0, finished runs): the adaptive routers are folded into the family's linear routers of the HF
  export and shipped exactly beside it (:mod:`.export`).

Checkpoints carry the map (its window's counts too); the phase and the mask follow from the step and the map on
resume. Refused with the fix: ``parallel.ep_size > 1`` (AutoEP rebuilds routers from the gate weight and runs
experts in one fused all-to-all call, so neither the adaptive router nor the per-token split fits it), a run that
also has ``callbacks.trainable`` (DES-MoE decides what trains), and what the gradient mask refuses (bf16, ZeRO-3,
optimizer offload).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from connito.adaptation.des_moe.config import DesMoeConfig
from connito.adaptation.des_moe.distill import RouterDistillation, kd_schedule
from connito.adaptation.des_moe.domain_map import ExpertDomainMap
from connito.adaptation.des_moe.export import calibration_captures, fold_into_state_dict, fold_layer, write_sidecar
from connito.adaptation.des_moe.phases import PhasePlan, backbone_parts, trainable_set
from connito.adaptation.des_moe.router import AdaptiveRouters
from connito.adaptation.des_moe.token_masks import TokenGradientMasks
from connito.common.atomic import atomic_write_text
from connito.experts import ExpertView
from connito.routing import RoutingRecord
from connito.training.callbacks import Callback, CallbackError, MicroBatch
from connito.training.callbacks.trainable import Trainable
from connito.training.grad_masks import GradientMask, freeze_untrainable
from connito.training.trainable_set import TrainableSet

if TYPE_CHECKING:
    from connito.training.trainer import Trainer

log = logging.getLogger("connito.adaptation")

MAP_FILE = "des_moe_map.json"


class DesMoe(Callback):
    """Options: the fields of :class:`connito.adaptation.des_moe.config.DesMoeConfig`."""

    def __init__(self, **options):
        self.config = DesMoeConfig(**options)
        self.schedule = kd_schedule(self.config.kd_schedule, self.config.kd_knots)
        self.routers: AdaptiveRouters | None = None
        self.mask: GradientMask | None = None
        self.token_masks: TokenGradientMasks | None = None
        self.map: ExpertDomainMap | None = None
        self._domains_T: torch.Tensor | None = None
        self.phase = 0
        self.last_lambda, self.last_phase, self.last_experts = 1.0, 0, 0

    # -- setup -----------------------------------------------------------------------------------------------------
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        cfg, config = trainer.cfg, self.config
        if cfg.parallel.ep_size != 1:
            raise CallbackError(
                f"callbacks.des_moe needs parallel.ep_size=1, not {cfg.parallel.ep_size}: DeepSpeed AutoEP rebuilds "
                "each router from its gate weight (dropping the adaptive router) and runs the experts in one fused "
                "all-to-all call that has no seam for per-token gradient masks. Use parallel.ep_size=1; ZeRO 1/2 "
                "(engine=zero2) spreads the optimizer state over the data-parallel ranks"
            )
        if any(isinstance(c, Trainable) for c in trainer.callbacks):
            raise CallbackError("callbacks.des_moe decides what trains (its phases); remove callbacks.trainable")
        domains = list(trainer.prepared.domains)
        unknown = [d for d in config.domains if d not in domains]
        if unknown:
            raise CallbackError(f"callbacks.des_moe.domains: {unknown} are not domains of the data ({domains})")
        self.domain_names = domains
        self.active = [domains.index(d) for d in config.domains] if config.domains else list(range(len(domains)))
        self.steps = cfg.train.steps
        self.warmup_steps = max(1, round(config.warmup * self.steps))
        self.plan = PhasePlan.from_fractions(config.phase_ends, config.phase_parts, self.steps)
        view = ExpertView(model)
        self.routers = AdaptiveRouters(model, config.router_hidden_mult, config.seed, view)
        self.backbone = backbone_parts(model, view)
        self.map = ExpertDomainMap(len(domains), view.moe_layers, view.num_experts, config.phi, config.ema_new)
        report = freeze_untrainable(model, trainable_set(self.plan.union(), view, None, self.backbone))
        if trainer.info.is_main:
            log.info(
                "des_moe: adaptive routers on MoE layers %s; phases start at steps %s training %s; map after %d "
                "warm-up steps, refreshed every %s; %d of %d parameters ever train",
                view.moe_layers, [0, *self.plan.starts], [sorted(p) for p in self.plan.parts], self.warmup_steps,
                config.refresh_every or "never", report.trainable_numel, report.total_numel,
            )  # fmt: skip

    def on_engine_built(self, trainer: Trainer) -> None:
        model = trainer.engine.module
        self.view = ExpertView(model)
        self.mask = GradientMask(trainer.engine, self.trainable(self.plan.phase_at(trainer.state.step)))
        self.kd = RouterDistillation(self.routers, self.config.tau)
        trainer.add_loss_term(self.kd)
        if self.config.token_masks:
            self.token_masks = TokenGradientMasks(model, self.view)
        self.subscription = trainer.router_observer().subscribe(self._count)

    def trainable(self, phase: int) -> TrainableSet:
        """What phase ``phase`` trains under the current map."""
        return trainable_set(self.plan.parts[phase], self.view, self.map.experts_LE(self.active), self.backbone)

    def _apply(self, step: int) -> None:
        """The mask and the per-token masks for optimizer step ``step`` (0-based)."""
        self.phase = self.plan.phase_at(step)
        trainable = self.trainable(self.phase)
        if trainable != self.mask.trainable:
            self.mask.set_trainable(trainable)
        if self.token_masks is not None:
            serves_DLE = self.map.serves_DLE
            if serves_DLE is None or "experts" not in self.plan.parts[self.phase]:
                self.token_masks.set_allowed(None)  # no map yet, or no expert trains: nothing to mask
            else:
                allowed_DLE = torch.zeros_like(serves_DLE)
                allowed_DLE[self.active] = serves_DLE[self.active]
                self.token_masks.set_allowed(allowed_DLE)

    def on_train_start(self, trainer: Trainer) -> None:
        self._apply(trainer.state.step)

    # -- per micro-batch and step ----------------------------------------------------------------------------------
    def on_micro_batch(self, trainer: Trainer, batch: MicroBatch) -> None:
        lam = self.schedule(batch.step / self.steps)
        self.kd.coef = lam
        trainer.task_loss_weight = 1.0 - lam
        self.last_lambda, self.last_phase, self.last_experts = lam, self.phase, len(self.mask.trainable.experts)
        self._domains_T = batch.domain_ids_BT.reshape(-1).to(trainer.engine.device)
        if self.token_masks is not None:
            self.token_masks.set_domains(self._domains_T)
        self.routers.take_captures()  # nothing left from a forward the distillation term did not see
        self.routers.capture = True

    def _count(self, record: RoutingRecord) -> None:
        if self._domains_T is not None and torch.is_grad_enabled():
            self.map.count(record.layer, self._domains_T, record.topk_ids_TK)

    def refresh_due(self, steps_done: int) -> bool:
        """Whether the map is rebuilt after ``steps_done`` steps: at the end of the warm-up, every ``refresh_every``
        steps after it, and (``lock_map_in_last_phase``) once more when the last phase starts, never after."""
        every, warmup = self.config.refresh_every, self.warmup_steps
        due = steps_done == warmup or (every > 0 and steps_done > warmup and (steps_done - warmup) % every == 0)
        if not self.config.lock_map_in_last_phase or not self.plan.starts:
            return due
        lock = self.plan.starts[-1]
        if steps_done < lock:
            return due
        if steps_done == lock:  # the last refresh, the map of the last phase (none with refresh_every=0)
            return steps_done == warmup or (steps_done > warmup and every > 0)
        return steps_done == warmup  # a warm-up that ends inside the last phase: its first map, then locked

    def on_step_end(self, trainer: Trainer, losses) -> None:
        step = trainer.state.step
        self.map.sync()  # collective: the window (and the checkpointed state) is the same on every rank
        if self.refresh_due(step):
            self.map.refresh()
            if trainer.info.is_main:
                atomic_write_text(trainer.run_dir / MAP_FILE, json.dumps(self.map_summary(step), indent=1))
                unseen = [self.domain_names[d] for d in self.active if not bool(self.map.estimated_D[d])]
                if unseen:
                    log.warning(
                        "des_moe: the expert-domain map has seen no token of %s yet (step %d), so those tokens train "
                        "no expert until a later refresh sees them; check the data's domains or set "
                        "callbacks.des_moe.domains to the ones it holds",
                        ", ".join(unseen), step,
                    )  # fmt: skip
        self._apply(step)

    def map_summary(self, step: int) -> dict:
        serves_DLE = self.map.serves_DLE
        return {
            "step": step,
            "refreshes": self.map.refreshes,
            "moe_layers": list(self.map.moe_layers),
            "active_domains": [self.domain_names[d] for d in self.active],
            "serves": {
                name: {
                    str(layer): serves_DLE[d, i].nonzero().flatten().tolist()
                    for i, layer in enumerate(self.map.moe_layers)
                }
                for d, name in enumerate(self.domain_names)
            },
        }

    def on_metrics(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        metrics["des_moe/lambda"] = self.last_lambda
        metrics["des_moe/phase"] = float(self.last_phase + 1)
        metrics["des_moe/trainable_experts"] = float(self.last_experts)

    # -- export and state ------------------------------------------------------------------------------------------
    def on_export(self, trainer: Trainer, state_dict: dict[str, torch.Tensor]) -> None:
        rows = trainer.val_split.input_ids_NT
        picks = torch.linspace(0, len(rows) - 1, min(self.config.calibration_rows, len(rows))).round().long()
        model = trainer.engine.module
        captures = calibration_captures(model, self.routers, rows[picks], trainer.cfg.train.micro_batch_size)
        folded, folds = {}, []
        for layer in self.view.moe_layers:
            folded[layer], fold = fold_layer(self.view, layer, self.routers, *captures[layer])
            folds.append(fold)
        fold_into_state_dict(state_dict, self.view, folded)
        write_sidecar(trainer.result.export_dir, self.view, self.routers, folds, config=asdict(self.config),
                      expert_map=self.map_summary(trainer.state.step))  # fmt: skip
        worst = min(folds, key=lambda f: f.topk_agreement)
        log.info(
            "des_moe: HF routers folded (%d of %d layers exact; lowest top-k agreement %.3f at layer %d); the exact "
            "adaptive routers are in %s", sum(f.exact for f in folds), len(folds), worst.topk_agreement, worst.layer,
            trainer.result.export_dir,
        )  # fmt: skip

    def on_load(self, trainer: Trainer, checkpoint) -> None:
        # The mask was built for step 0; the optimizer state just loaded is the checkpoint step's. Narrow to that
        # step's set *before* anything zeroes first moments under the old set (GradientMask.refresh zeroes those of
        # every element its current set freezes, which at step 0 would be every expert).
        if self.trainable(self.plan.phase_at(trainer.state.step)) == self.mask.trainable:
            self.mask.refresh()  # DeepSpeed relinked the ZeRO partitions
        self._apply(trainer.state.step)  # set_trainable rebuilds the partition mapping itself

    def state_dict(self) -> dict:
        return {"map": self.map.state_dict()} if self.map is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "map" in state:
            self.map.load_state_dict(state["map"])
