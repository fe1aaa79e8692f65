"""The trainer's extension points: callbacks (events of the run) and loss terms (added to the loss per micro-batch).

A method (ESFT masks, DES-MoE, pruning schedules, ...) plugs into the one training loop as a :class:`Callback`
chosen by config, never as a loop of its own::

    @register_callback("my_method")
    class MyMethod(Callback):
        def __init__(self, coef: float = 0.1): ...
        def on_engine_built(self, trainer):            # final model and optimizer: attach hooks here
            trainer.add_loss_term(MyTerm(self.coef))
        def on_step_end(self, trainer, losses): ...     # after each optimizer step
        def state_dict(self): ...                       # saved with every checkpoint, restored on resume

and ``connito train plugins='[my_pkg.methods]' +callbacks.my_method.coef=0.2`` (Hydra's ``+`` adds a key; a callback
without options is ``+callbacks.my_method={}``): the run imports the modules
listed under ``plugins`` (where the ``@register_callback`` lines run), so users extend the trainer without forking.
Connito's own callbacks are found by name without any import first (:mod:`.registry`, one table).

Events, in the order a run sees them (``trainer`` is :class:`connito.training.trainer.Trainer`):

* ``on_model_built(trainer, model)``: the transformers model is built (or loaded), before ``deepspeed.initialize``
  (so before AutoEP swaps its MoE blocks and before the optimizer exists): what must shape the optimizer happens
  here, e.g. ``requires_grad=False`` on parameters that get no gradient and no optimizer state
  (:mod:`connito.training.grad_masks`). ``trainer.engine`` does not exist yet;
* ``on_engine_built(trainer)``: after ``deepspeed.initialize`` (AutoEP's swap done, optimizer final), before a
  resumed checkpoint is loaded: parameter, gradient and optimizer hooks attach here;
* ``load_state_dict(state)``: on resume, with what ``state_dict()`` returned when the checkpoint was written;
* ``on_train_start(trainer)``: once, right before the first step of this invocation (after a resume's load);
* ``on_micro_batch(trainer, batch)``: before each micro-batch's forward, with its :class:`MicroBatch` (tokens and
  the domain of every token): per-token state for hooks goes here, and so do per-step loss weights (a term's
  ``coef``, ``trainer.task_loss_weight``);
* per micro-batch, every registered :class:`LossTerm` is added to the loss
  (``task_loss_weight * lm_loss + sum(coef * value)``);
* ``on_step_end(trainer, losses)``: after every optimizer step (the gradient-accumulation boundary);
* ``on_metrics(trainer, metrics)``: add entries to a step's logged metrics (collective: every rank calls it);
* ``on_evaluate(trainer, results)``: after each validation;
* ``on_save(trainer, checkpoint)`` / ``on_load(trainer, checkpoint)``: after a checkpoint is written / loaded;
* ``on_train_end(trainer)``: once, when the loop stops (finished or not);
* ``on_export(trainer, state_dict)``: on rank 0, right before the HF export of a finished run is written: edit the
  model's ``state_dict`` (transformers names) in place, e.g. fold a router variant back into the family's router and
  drop what plain transformers cannot load. Files a callback writes into ``trainer.result.export_dir`` stay;
* ``on_exported(trainer, export_dir)``: on every rank, once that export is on disk: build on it (the progressive
  pruning callback writes its pruned checkpoint here).

Callback state must be the same on every rank (reduce it first): rank 0's is saved, every rank loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from connito.training.trainer import Trainer


class CallbackError(ValueError):
    """A callback or loss term the trainer cannot use; the message names the fix."""


@dataclass(frozen=True)
class MicroBatch:
    """What a loss term sees of the micro-batch: its tokens and the domain of each token."""

    input_ids_BT: torch.Tensor
    domain_ids_BT: torch.Tensor
    step: int
    micro_step: int


class LossTerm:
    """One term of the training loss: ``loss = lm_loss + sum(coef * term(batch, outputs))``.

    ``__call__`` returns a scalar tensor (or None to skip this micro-batch); it is logged as ``train/<name>``."""

    name: str = "loss_term"
    coef: float = 1.0

    def __call__(self, batch: MicroBatch, outputs: Any) -> torch.Tensor | None:
        raise CallbackError(f"loss term {type(self).__name__} does not define __call__")


class Callback:
    """Override the events you need; every default does nothing."""

    name: str = ""
    """Set from the config key (or registry name) the callback was built from."""

    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        pass

    def on_engine_built(self, trainer: Trainer) -> None:
        pass

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_micro_batch(self, trainer: Trainer, batch: MicroBatch) -> None:
        pass

    def on_step_end(self, trainer: Trainer, losses: Mapping[str, float]) -> None:
        pass

    def on_metrics(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, results: Mapping[str, float]) -> None:
        pass

    def on_save(self, trainer: Trainer, checkpoint) -> None:
        pass

    def on_load(self, trainer: Trainer, checkpoint) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def on_export(self, trainer: Trainer, state_dict: dict[str, torch.Tensor]) -> None:
        pass

    def on_exported(self, trainer: Trainer, export_dir) -> None:
        """After the HF export of a finished run is written (every rank; ``export_dir`` is ``<run>/hf``): build on
        it here (a pruned copy, a report)."""
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_loss_value(term: LossTerm, value: Any) -> torch.Tensor:
    """A loss term's value must be a scalar tensor; anything else stops the run before the optimizer steps."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CallbackError(
            f"loss term '{term.name}' returned {shape}, not a scalar tensor: reduce it (e.g. .mean()) before "
            "returning it"
        )
    if not value.is_floating_point():
        raise CallbackError(f"loss term '{term.name}' returned a {value.dtype} tensor; return a floating-point loss")
    return value
