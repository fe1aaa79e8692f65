"""``callbacks.trainable``: train only chosen experts (plus shared experts, routers or named modules when asked),
with slice-exact gradient masks (:mod:`connito.training.grad_masks`)::

    connito train +callbacks.trainable.mask_file=esft_mask.json
    connito train '+callbacks.trainable.experts=[[1,0],[1,5],[3,2]]' +callbacks.trainable.routers=true
    connito train +callbacks.trainable.mask_file=m.json '+callbacks.trainable.modules=[lm_head.weight]'
    connito train model.path=owner '+callbacks.trainable.experts=[[0,1],[1,1]]' +callbacks.trainable.router_rows=true

``routers=true`` trains every MoE layer's router whole; ``router_rows=true`` only the router rows of the trainable
experts (each layer's rows of the experts named for it; the other rows stay bit-identical): a FlexOLMo data owner
trains its expert and its router row against the frozen public ones
(:func:`connito.composition.flexolmo.owner_start`). The two exclude each other.

``mask_file`` is a ``connito.mask/1`` file (``connito select``; its fingerprint must be that of ``model.path``, the
checkpoint it was selected on) or a bare :class:`connito.experts.ExpertMask` JSON file (``ExpertMask.to_json``:
``shape``, ``moe_layers``, ``experts`` per layer; shape-checked only); ``experts`` lists ``[layer, expert]`` pairs
in the global numbering. Give exactly one of them (``experts=[]`` trains no routed expert, for a run that trains
routers or modules only).

``lean`` (default true): each MoE layer that trains some but not all of its experts keeps its trainable experts
as compact parameters of their own (:mod:`connito.experts.lean`), so the frozen experts cost no weight gradient and
no AdamW state; ``lean=false`` is the mask-only path (the whole fused expert tensors in the optimizer, frozen rows
masked), kept for comparison, for experts modules the lean forward does not compute (the error names them) and for
a run that must resume under another expert-parallel layout (lean slots are shaped by it).

Events: ``on_model_built`` freezes every parameter with no trainable element (no gradient, no optimizer state);
``on_engine_built`` attaches the gradient mask to the live (possibly AutoEP-sharded) model and the optimizer. The
current trainable set is saved with every checkpoint and restored on resume, so a method that changed it between
steps (``callback.mask.set_trainable``) resumes with the set it had. Rank 0 writes the starting set to
``<run_dir>/trainable.json``.
"""

from __future__ import annotations

import json
import logging
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from connito.experts import ExpertAddressError, ExpertMask, ExpertView
from connito.experts.mask_file import MASK_SCHEMA, read_mask_file
from connito.models.fingerprint import checkpoint_fingerprint
from connito.training.callbacks.base import Callback, CallbackError
from connito.training.grad_masks import GradientMask, check_engine_config, freeze_untrainable
from connito.training.trainable_set import TrainableSet, expert_mask_from_ids

if TYPE_CHECKING:
    from connito.training.trainer import Trainer

log = logging.getLogger("connito.training")


class Trainable(Callback):
    """Options: ``mask_file`` or ``experts`` (one of them), ``shared_experts``, ``routers`` or ``router_rows``,
    ``modules``, ``lean``."""

    def __init__(
        self,
        mask_file: str | None = None,
        experts: list | None = None,
        shared_experts: bool = False,
        routers: bool = False,
        modules: list[str] | tuple[str, ...] = (),
        router_rows: bool = False,
        lean: bool = True,
    ):
        if (mask_file is None) == (experts is None):
            raise CallbackError(
                "callbacks.trainable needs exactly one of mask_file (an ExpertMask JSON file) or experts "
                "([[layer, expert], ...]; [] for none)"
            )
        if mask_file is not None and not Path(mask_file).expanduser().is_file():
            raise CallbackError(f"callbacks.trainable.mask_file='{mask_file}' is not a file")
        if routers and router_rows:
            raise CallbackError(
                "callbacks.trainable: routers=true trains every router whole, router_rows=true only the trainable "
                "experts' rows; set one of them"
            )
        if isinstance(modules, str):
            modules = [modules]
        self.mask_file, self.experts = mask_file, experts
        self.shared_experts, self.routers, self.modules = bool(shared_experts), bool(routers), tuple(modules)
        self.router_rows = bool(router_rows)
        self.lean = bool(lean)
        self.trainable: TrainableSet | None = None
        self._base_path: str | None = None
        self.mask: GradientMask | None = None

    def trainable_set(self, view: ExpertView) -> TrainableSet:
        if self.mask_file is not None:
            path = Path(self.mask_file).expanduser()
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise CallbackError(f"callbacks.trainable.mask_file='{path}' is not JSON: {err}") from None
            if isinstance(record, dict) and record.get("schema") == MASK_SCHEMA:
                # a `connito select` mask file: checked against the base checkpoint's fingerprint
                experts = read_mask_file(path, self.base_fingerprint(), view=view).mask
                return self._with(experts)
            try:
                experts = ExpertMask.from_dict(record)
            except (ExpertAddressError, KeyError, TypeError, ValueError) as err:
                raise CallbackError(f"callbacks.trainable.mask_file='{path}' is not an expert mask: {err}") from None
        else:
            try:
                experts = expert_mask_from_ids(view, [tuple(pair) for pair in self.experts])
            except TypeError:
                raise CallbackError(
                    f"callbacks.trainable.experts={self.experts!r}: give [[layer, expert], ...] pairs"
                ) from None
        return self._with(experts)

    def _with(self, experts: ExpertMask) -> TrainableSet:
        return TrainableSet(experts, self.shared_experts, self.routers, self.modules, self.router_rows)

    def base_fingerprint(self) -> str:
        """The fingerprint a ``connito.mask/1`` file must carry: the base checkpoint's (``model.path``)."""
        if self._base_path is None:
            raise CallbackError(
                f"callbacks.trainable.mask_file='{self.mask_file}' is a mask file of a checkpoint (fingerprint "
                "checked), but this run builds its model from a config: set model.path=<the checkpoint the mask was "
                "selected on>, or pass the experts as callbacks.trainable.experts=[[layer, expert], ...]"
            )
        return checkpoint_fingerprint(self._base_path)

    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        check_engine_config(trainer.cfg.engine)
        if not trainer.family.is_moe:
            self._freeze_dense(trainer, model)
            return
        self._base_path = trainer.cfg.model.path or None
        self.trainable = self.trainable_set(ExpertView(model))
        ep_size = trainer.cfg.parallel.ep_size
        report = freeze_untrainable(model, self.trainable, self.lean, ep_size, trainer.info.rank % ep_size)
        if trainer.info.is_main:
            log.info(
                "trainable: %d of %d parameters (%.1f%%); %d tensors frozen, %d masked by expert; %s",
                report.trainable_numel, report.total_numel, 100 * report.trainable_numel / report.total_numel,
                len(report.frozen), len(report.masked),
                f"lean experts on MoE layers {report.lean.layers} ({report.lean.slots} slots on rank 0)"
                if report.lean and report.lean.layers else "no lean experts (mask-only path)",
            )  # fmt: skip
            (trainer.run_dir / "trainable.json").write_text(json.dumps(self.trainable.to_dict(), indent=1))

    def _freeze_dense(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """A model without routed experts (a dense seed, a BTS model): train the parameters ``modules`` names, freeze
        every other one whole (no gradient, no optimizer state, bit-identical)."""
        kind = f"{trainer.family.model_type} is a dense model (no routed experts or routers)"
        if self.mask_file is not None or self.experts or self.shared_experts or self.routers or self.router_rows:
            raise CallbackError(
                f"callbacks.trainable: {kind}; name what trains with callbacks.trainable.modules=[<name glob>, ...] "
                "and experts=[]"
            )
        names = {id(p): [] for p in model.parameters()}
        for name, param in model.named_parameters(remove_duplicate=False):  # tied names count
            names[id(param)].append(name)
        params = {id(p): p for p in model.parameters()}
        chosen = {pid for pid, ns in names.items() if any(fnmatch(n, g) for n in ns for g in self.modules)}
        if not chosen:
            raise CallbackError(
                f"callbacks.trainable.modules={list(self.modules)} matches no parameter of this {kind}: e.g. "
                f"{names[next(iter(names))][0]}"
            )
        for pid, param in params.items():
            if pid not in chosen:
                param.requires_grad_(False)
        trained = sum(params[pid].numel() for pid in chosen)
        total = sum(p.numel() for p in params.values())
        if trainer.info.is_main:
            log.info("trainable: %d of %d parameters (%.1f%%) of a dense model, by name: %s", trained, total,
                     100 * trained / total, list(self.modules))  # fmt: skip
            record = {"dense": True, "modules": list(self.modules), "trainable_numel": trained, "total_numel": total}
            (trainer.run_dir / "trainable.json").write_text(json.dumps(record, indent=1))

    def on_engine_built(self, trainer: Trainer) -> None:
        if self.trainable is not None:  # None: a dense model, frozen whole-tensor by requires_grad alone
            self.mask = GradientMask(trainer.engine, self.trainable)

    def on_load(self, trainer: Trainer, checkpoint) -> None:
        if self.mask is not None:
            self.mask.refresh()

    def state_dict(self) -> dict:
        return {"trainable": self.mask.trainable.to_dict()} if self.mask is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "trainable" in state:
            self.mask.set_trainable(TrainableSet.from_dict(state["trainable"]))
