"""The callbacks every run has: metrics logging, validation, checkpoints, the HF export, load balancing.

They use the same events a user's callback does; the trainer puts them after the user's callbacks, so a user's
``on_step_end`` runs before the step is logged, validated and checkpointed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from connito.routing import LoadBalancingLoss, needs_observed_loss
from connito.training.callbacks.base import Callback, LossTerm, MicroBatch
from connito.training.progress import Progress
from connito.training.report import format_domain_table

if TYPE_CHECKING:
    from connito.training.trainer import Trainer


class MetricsLogger(Callback):
    """Every ``train.log_every`` steps (and the last): losses averaged over ranks, learning rate, gradient norm,
    tokens/s, plus what callbacks add in ``on_metrics``; to metrics.jsonl, wandb and the progress bar."""

    def on_train_start(self, trainer: Trainer) -> None:
        cfg, step = trainer.cfg, trainer.state.step
        self.progress = Progress(cfg.train.steps, step, enabled=trainer.info.is_main and cfg.logging.progress)
        self.started_at, self.started_step = time.perf_counter(), step

    def on_step_end(self, trainer: Trainer, losses: Mapping[str, float]) -> None:
        step, cfg = trainer.state.step, trainer.cfg
        if step % cfg.train.log_every and step != cfg.train.steps:
            return
        elapsed = time.perf_counter() - self.started_at
        tokens_per_s = (step - self.started_step) * trainer.tokens_per_step / max(elapsed, 1e-9)
        metrics = step_metrics(losses, trainer.engine, trainer.scheduler, trainer.info.world_size, tokens_per_s)
        for callback in trainer.callbacks:
            callback.on_metrics(trainer, metrics)
        trainer.sink.log(step, metrics)
        self.progress.update(step, loss=metrics["train/loss"], tokens_per_s=tokens_per_s)

    def on_train_end(self, trainer: Trainer) -> None:
        self.progress.close()


def step_metrics(losses: Mapping[str, float], engine, scheduler, world_size: int, tokens_per_s: float) -> dict:
    """The logged metrics of a step: losses averaged over ranks (a collective), learning rate, speed, grad norm."""
    terms = sorted(k for k in losses if k != "loss")
    stats = torch.tensor([losses["loss"], *(losses[k] for k in terms)], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(stats)
        stats /= world_size
    metrics = {
        "train/loss": stats[0].item(),
        "train/lr": scheduler.get_last_lr()[0],
        "train/tokens_per_s": tokens_per_s,
    }
    for index, name in enumerate(terms, start=1):
        metrics[f"train/{name}"] = stats[index].item()
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


class Evaluator(Callback):
    """Per-domain validation every ``train.eval_every`` steps and once at the end of a finished run."""

    def on_step_end(self, trainer: Trainer, losses: Mapping[str, float]) -> None:
        every, step = trainer.cfg.train.eval_every, trainer.state.step
        if every and step % every == 0 and step < trainer.cfg.train.steps:
            trainer.evaluate()

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.result.finished:
            trainer.evaluate()


class Checkpointer(Callback):
    """A checkpoint every ``train.checkpoint_every`` steps and when the loop stops (unless that step has one)."""

    def on_step_end(self, trainer: Trainer, losses: Mapping[str, float]) -> None:
        every = trainer.cfg.train.checkpoint_every
        if every and trainer.state.step % every == 0:
            trainer.save_checkpoint()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()


class Exporter(Callback):
    """At the end of a finished run: the HF export (after every callback's ``on_export`` edited its state dict),
    ``summary.json`` and the per-domain table."""

    def on_train_end(self, trainer: Trainer) -> None:
        result = trainer.result
        if not result.finished:
            return
        if trainer.info.is_main:
            from connito.data import unigram_cross_entropy

            result.unigram = unigram_cross_entropy(trainer.prepared, "validation")
        if trainer.cfg.train.export:
            from connito.training.export import export_hf

            result.export_dir = trainer.run_dir / "hf"

            def edit(state_dict: dict[str, torch.Tensor]) -> None:
                for callback in trainer.callbacks:
                    callback.on_export(trainer, state_dict)

            export_hf(
                trainer.engine,
                trainer.tokenizer,
                result.export_dir,
                trainer.info.is_main,
                trainer.cfg.engine.zero_stage,
                edit=edit,
                start=trainer.cfg.model.path or None,
            )
            for callback in trainer.callbacks:
                callback.on_exported(trainer, result.export_dir)
        if trainer.info.is_main:
            write_summary(result, trainer.family.model_type)


def write_summary(result, model_type: str) -> None:
    summary = {
        "model_type": model_type,
        "steps": result.steps_done,
        "validation_loss": result.validation,
        "unigram_loss": result.unigram,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "hf_export": str(result.export_dir) if result.export_dir else None,
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_domain_table(result.validation, result.unigram), flush=True)
    print(f"checkpoint: {result.checkpoint}", f"HF export:  {result.export_dir}", sep="\n", flush=True)
    print(f"metrics:    {result.run_dir / 'metrics.jsonl'}", flush=True)


class LoadBalancingTerm(LossTerm):
    """The family's load-balancing loss, ``model.aux_loss_coef`` times: transformers' ``outputs.aux_loss``, or,
    where AutoEP's custom-pattern layers hide the router logits from transformers, the same function over the
    logits router observation captured (:mod:`connito.routing.load_balancing`)."""

    name = "aux_loss"

    def __init__(self, coef: float, observed: LoadBalancingLoss | None):
        self.coef, self.observed = coef, observed

    def __call__(self, batch: MicroBatch, outputs) -> torch.Tensor | None:
        if self.observed is not None:
            return self.observed.compute()
        return getattr(outputs, "aux_loss", None)


class LoadBalancing(Callback):
    """Adds :class:`LoadBalancingTerm` when the family has a load-balancing loss and ``model.aux_loss_coef > 0``."""

    def on_engine_built(self, trainer: Trainer) -> None:
        model, coef = trainer.engine.module, trainer.cfg.model.aux_loss_coef
        if not trainer.family.has_aux_loss or coef <= 0:
            return
        observed = LoadBalancingLoss(model, trainer.router_observer()) if needs_observed_loss(model) else None
        trainer.add_loss_term(LoadBalancingTerm(coef, observed))
