"""Slice-exact gradient masks: train some experts (and optionally shared experts, routers, named modules) of a
model whose routed experts are stored fused, ``[E, ...]`` per tensor, and leave every other element bit-identical.

A :class:`~connito.training.trainable_set.TrainableSet` says what trains: routed experts by global
``(layer, expert)`` (an :class:`connito.experts.ExpertMask`), plus shared experts, routers, or modules by name glob
only when asked. :mod:`connito.training.trainable_set` resolves it against a live model (plain transformers or
AutoEP-sharded) to one row mask per parameter: ``keep_R``, a bool per index of dimension 0 (the expert dimension
of a stacked expert tensor; one row for everything else, which trains whole or not at all). Routers train whole
(``routers``) or by rows (``router_rows``): in each MoE layer only the rows of its router weight [E, H] (and the
entries of a router bias [E], where a router has one) that belong to the layer's trainable routed experts, as
FlexOLMo trains a data owner's router row beside the frozen public one. AutoEP's swapped router (``router.gate``, an
``nn.Linear``) holds every global expert's row on every rank, so the row mask is the same global mask under expert
parallelism. Two mechanisms make the mask exact:

* **no gradient, no state** (:func:`freeze_untrainable`, before the engine is built): a parameter with no trainable
  row gets ``requires_grad=False``, so autograd computes nothing for it and neither the torch optimizer (ZeRO 0) nor
  DeepSpeed's flat partitions (ZeRO 1/2) hold it or its AdamW moments. Under expert parallelism this runs on the
  transformers model before AutoEP swaps the blocks: AutoEP copies each fused source tensor's flag onto its packed
  ``w1/w2/w3`` (it refuses mixed flags inside one packed tensor, so slices are never frozen by flags).
* **masked gradient and masked update** (:class:`GradientMask`, once the engine is built) for tensors that are
  partly trainable:

  1. a gradient hook on the parameter (``Tensor.register_hook``: it sees each backward's gradient before it is
     accumulated into ``.grad`` or into DeepSpeed's reduction buckets) zeroes the frozen rows. Everything downstream
     of it -- gradient accumulation, the data-parallel average, the ZeRO-1/2 flat gradient partitions, the global
     norm DeepSpeed clips by -- therefore sees exact zeros there; the norm equals the norm of the trainable elements
     alone, as in a run that holds only them;
  2. an optimizer step pre-hook on the inner torch AdamW applies AdamW's decoupled weight decay itself, to the
     trainable elements only, with torch's own expression (``p.mul_(1 - lr * weight_decay)``, before the Adam
     update, as ``torch.optim.adam._single_tensor_adam`` orders it), and sets the group's ``weight_decay`` to 0 for
     that step (a post-hook puts it back, so checkpoints and schedulers see the configured value). Only groups
     holding a masked tensor are touched;
  3. with a zero gradient and a zero first moment, Adam's update of an element is exactly ``-lr * 0 / (sqrt(v) +
     eps) = -0.0``: ``p + (-0.0)`` is ``p`` bit for bit. The first moment of a frozen element is zero from the
     start (its gradient always was) or is zeroed when the mask changes (:meth:`GradientMask.set_trainable`): an
     expert that becomes frozen is moved by neither weight decay nor stale momentum. Its second moment is kept
     (it only divides a zero).

Under ZeRO 1/2 the inner optimizer steps flat fp32 partitions, not parameters: the row masks become ranges of each
partition through DeepSpeed's fragment addresses (:mod:`connito.training.zero_partitions`), so the decay and the
moment zeroing follow the partition. Under expert parallelism every rank masks its own packed shard with the
global ids of its local experts (``ExpertView.expert_param_slices``). A rank whose shard has no trainable expert
while another rank's has keeps the shard in the optimizer, fully masked: ``requires_grad`` must agree on every rank
of a layer so DeepSpeed builds the same parameter groups (and collectives) everywhere, so only tensors with no
trainable element on *any* rank (decided on the transformers model) lose their optimizer state.

Changing the mask between steps (DES-MoE phases) is :meth:`GradientMask.set_trainable`: the new set must lie inside
what was trainable when the optimizer was built (a frozen parameter has no optimizer state to resume), so a method
with phases freezes with the union of its phases and narrows afterwards. The gradient hook reads the current mask at
every backward, so a method may also change it between micro-batches; the weight decay and moment zeroing use the
mask in force when the optimizer steps. An expert that becomes trainable again restarts with a zero first moment,
its decayed second moment, and the bias correction of its tensor's step count. Per-token masks (DES-MoE: a domain's
tokens update only that domain's experts) act on the backward pass itself (which tokens' contributions reach an
expert's gradient) and compose with this mask, which keeps the optimizer side exact.

**Lean experts** (the default, ``freeze_untrainable(lean=True)``; :mod:`connito.experts.lean`): a mask alone saves
little, because optimizer state is per tensor (per flat partition under ZeRO 1/2): a fused expert tensor with one
trainable expert would keep AdamW moments for all its experts and its backward would compute every expert's weight
gradient (an ESFT-sized mask kept 98% of full fine-tuning's AdamW state). So every MoE layer that trains some but
not all of its experts gets compact *slots*: its fused tensors freeze whole (the first mechanism) and the trainable
experts this rank holds become parameters ``<layer>.lean_experts.{gate_up_proj,down_proj}`` [G, ...] that the
experts forward computes through (weight gradient only for them, ``kernels/``). The slots are ordinary trainable
parameters to everything here: they get row masks like any other (a slot row trains while its expert is in the
set; :meth:`GradientMask.set_trainable` narrows them, and a padding slot of a rank with fewer trainable experts
than another, under expert parallelism, is fully masked), and they stay trainable on every rank so the optimizer
groups agree. A layer whose experts all train keeps its fused tensors (nothing to save); a layer with none freezes
them. The slots can only hold the experts trainable when the engine is built (widen the set, and you get
:class:`GradientMaskError` naming the fix, as with a frozen tensor). ``lean=False`` (``callbacks.trainable.lean``) is
the mask-only path: the fallback for experts modules the lean forward does not compute (transposed, biased or
ungated experts; the install names the module), and for a run that must resume under another expert-parallel
layout (lean slots are shaped by it; :func:`connito.training.relayout.require_relayable`).

Supported: the torch AdamW (or Adam without weight decay) the trainer builds, fp32, ZeRO 0/1/2, any ``ep_size``.
Refused with the fix: bf16, ZeRO-3, ZeRO-Offload, coupled (L2) weight decay. Resuming a ZeRO-2 run with frozen
expert shards under expert parallelism needs :func:`connito.training.deepspeed_internals.restore_frozen_expert_shards`
(DeepSpeed 0.19.8 overwrites them with rank 0's); the trainer's checkpoint load calls it.

Shape legend: L decoder layers, E routed experts per MoE layer, R rows of a parameter (its dimension 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from connito.experts.lean.install import LeanReport, bind_autoep, install, lean_layers
from connito.training.config import EngineConfig
from connito.training.deepspeed_internals import inner_optimizer, offloads_optimizer
from connito.training.trainable_set import (
    GradientMaskError,
    ParamMask,
    TrainableSet,
    check_expert_mask,
    resolve_masks,
)
from connito.training.zero_partitions import OptimizerTensor, Ranges, complement, optimizer_tensors

log = logging.getLogger("connito.training")


@dataclass(frozen=True)
class FreezeReport:
    frozen: list[str]
    """Parameters set to ``requires_grad=False`` (no trainable element)."""
    masked: list[str]
    """Parameters partly trainable: they keep a gradient, masked by :class:`GradientMask`."""
    trainable_numel: int
    total_numel: int
    lean: LeanReport | None = None
    """The layers whose trainable experts got lean slots (None: the mask-only path)."""


def freeze_untrainable(
    model: nn.Module, trainable: TrainableSet, lean: bool = True, ep_size: int = 1, ep_rank: int = 0
) -> FreezeReport:
    """Before the engine is built: ``requires_grad=False`` on every parameter with no trainable element, so it gets
    no gradient and no optimizer state. Refuses a set that trains nothing, and a trainable parameter something else
    already froze (its optimizer state would be missing).

    ``lean`` (the default): every MoE layer that trains some but not all of its experts gets lean slots
    (:mod:`connito.experts.lean`): its fused expert tensors freeze and the trainable experts (those of this
    expert-parallel rank, ``ep_rank`` of ``ep_size``) become compact parameters of their own, so frozen experts get
    no weight gradient and no optimizer state. ``lean=False`` keeps the mask-only path (whole fused tensors in the
    optimizer, frozen rows masked)."""
    report = None
    if lean:
        check_expert_mask(model, trainable)
        report = install(model, trainable.experts, ep_size, ep_rank)
    masks = resolve_masks(model, trainable)
    blocked = [m.name for m in masks if m.any and not m.param.requires_grad]
    if blocked:
        raise GradientMaskError(
            f"{blocked[:3]} are in the trainable set but already have requires_grad=False; unfreeze them or leave "
            "them out of the trainable set"
        )
    if not any(m.any for m in masks):
        raise GradientMaskError(
            "the trainable set selects nothing: name experts (mask_file / experts), or set shared_experts, routers "
            "or modules (router_rows trains the rows of the named experts only)"
        )
    # A layer's slots stay trainable on every rank, even where this rank's are padding only (ep > 1): every rank of
    # a layer must build the same optimizer groups and the same autograd graph through AutoEP's all-to-alls.
    slot_params = {id(p) for slots in lean_layers(model).values() for p in slots.parameters()}
    frozen = [m for m in masks if not m.any and id(m.param) not in slot_params]
    for m in frozen:
        m.param.requires_grad_(False)
    return FreezeReport(
        frozen=[m.name for m in frozen],
        masked=[m.name for m in masks if m.any and not m.all],
        trainable_numel=sum(m.trainable_numel() for m in masks),
        total_numel=sum(m.param.numel() for m in masks if id(m.param) not in slot_params),
        lean=report,
    )


def _refuse(stage: int, low_precision: bool, offload: bool) -> None:
    if stage not in (0, 1, 2):
        raise GradientMaskError(
            f"gradient masks support engine.zero_stage 0, 1 and 2, not {stage}: ZeRO-3 partitions every parameter "
            "and its mapping is not implemented. Use engine.zero_stage=2"
        )
    if low_precision:
        raise GradientMaskError(
            "gradient masks are exact in fp32 only (engine.precision=fp32): DeepSpeed's bf16 optimizer keeps its "
            "own flat fp32 copies that this mask does not map. Set engine.precision=fp32"
        )
    if offload:
        raise GradientMaskError(
            "gradient masks do not support engine.offload_optimizer=true (DeepSpeed's CPU Adam steps the offloaded "
            "partitions outside the torch optimizer). Set engine.offload_optimizer=false"
        )


def check_engine_config(engine: EngineConfig) -> None:
    """:func:`check_engine` from the config alone: run it before any engine is built."""
    _refuse(engine.zero_stage, engine.precision != "fp32", engine.offload_optimizer)


def check_engine(engine, inner: torch.optim.Optimizer) -> None:
    """Refuse the engine settings under which the masked update would not be exact."""
    low_precision = engine.bfloat16_enabled() or engine.fp16_enabled()
    _refuse(engine.zero_optimization_stage(), low_precision, offloads_optimizer(engine))
    if not isinstance(inner, torch.optim.Adam):
        raise GradientMaskError(f"gradient masks need torch AdamW as the optimizer, got {type(inner).__name__}")
    for group in inner.param_groups:
        if group.get("weight_decay", 0) and not group.get("decoupled_weight_decay", False):
            raise GradientMaskError(
                "Adam with coupled (L2) weight decay adds the decay to the gradient, so frozen elements would move: "
                "use AdamW (decoupled weight decay)"
            )
        if group.get("maximize", False):
            raise GradientMaskError("gradient masks do not support maximize=True")


class GradientMask:
    """The masked gradient and update on a built engine; see the module docstring.

    ``GradientMask(engine, trainable)`` attaches the gradient hooks and the optimizer hooks; :meth:`set_trainable`
    changes the mask between steps; :meth:`refresh` rebuilds the ZeRO partition mapping after a checkpoint load;
    :meth:`remove` detaches everything."""

    def __init__(self, engine, trainable: TrainableSet):
        self.engine = engine
        self.inner = inner_optimizer(engine)
        check_engine(engine, self.inner)
        bind_autoep(engine.module)  # lean slots under expert parallelism: AutoEP's experts compute through them
        self._keep: dict[int, torch.Tensor | bool] = {}
        self._masks: list[ParamMask] = []
        self._tensors: dict[int, OptimizerTensor] = {}
        self._stashed: list[tuple[dict, float]] = []
        self.trainable = trainable
        self._apply(trainable)
        self._handles = [
            param.register_hook(self._grad_hook(param)) for param in engine.module.parameters() if param.requires_grad
        ]
        self._handles.append(self.inner.register_step_pre_hook(self._before_step))
        self._handles.append(self.inner.register_step_post_hook(self._after_step))
        if not dist.is_initialized() or dist.get_rank() == 0:
            stage = engine.zero_optimization_stage()
            log.info(
                "gradient masks: ZeRO %d, masked %s; %d tensors masked by expert rows, %d trained whole",
                stage, "on DeepSpeed's flat fp32 partitions" if stage else "on the parameters",
                sum(not m.all for m in self._masks), sum(m.all for m in self._masks),
            )  # fmt: skip

    # -- the mask --------------------------------------------------------------------------------------------------
    def set_trainable(self, trainable: TrainableSet) -> None:
        """Change the mask between optimizer steps. Elements leaving the trainable set lose their first moment now
        (so stale momentum cannot move them); the set must stay inside what was trainable when the engine was
        built."""
        self._apply(trainable)
        self.trainable = trainable
        self._zero_frozen_moments()

    def refresh(self) -> None:
        """Rebuild the optimizer-tensor mapping (DeepSpeed relinks the ZeRO partitions when it loads a checkpoint)."""
        self._tensors = optimizer_tensors(self.engine, self.inner, self._param_ranges())
        self._zero_frozen_moments()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def masks(self) -> list[ParamMask]:
        return list(self._masks)

    def _apply(self, trainable: TrainableSet) -> None:
        masks = resolve_masks(self.engine.module, trainable)
        outside = [m.name for m in masks if m.any and not m.param.requires_grad]
        if outside:
            raise GradientMaskError(
                f"{outside[:3]} cannot become trainable: they were frozen (requires_grad=False, no optimizer state) "
                "when the engine was built. Freeze with the widest set the run will use (the union of its phases) "
                "before the engine is built, then narrow it with set_trainable"
            )
        self._masks = [m for m in masks if m.param.requires_grad]
        keep = {}
        for m in self._masks:
            if m.all:
                keep[id(m.param)] = True
            elif not m.any:
                keep[id(m.param)] = False
            else:
                shape = (m.rows,) + (1,) * max(m.param.dim() - 1, 0)
                keep[id(m.param)] = m.keep_R.to(m.param.device).view(shape)
        self._keep = keep
        self._tensors = optimizer_tensors(self.engine, self.inner, self._param_ranges())

    def _param_ranges(self) -> dict[int, Ranges | None]:
        return {id(m.param): None if m.all else m.ranges() for m in self._masks}

    def _zero_frozen_moments(self) -> None:
        with torch.no_grad():
            for entry in self._tensors.values():
                state = self.inner.state.get(entry.tensor)
                if entry.trainable is None or not state or "exp_avg" not in state:
                    continue
                flat = state["exp_avg"].view(-1)
                for start, stop in complement(entry.trainable, flat.numel()):
                    flat[start:stop].zero_()

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _grad_hook(self, param: nn.Parameter):
        key = id(param)

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            keep = self._keep.get(key, True)
            if keep is True:
                return None
            if keep is False:
                return torch.zeros_like(grad)
            return grad.masked_fill(~keep, 0.0)

        return hook

    def _before_step(self, optimizer, args, kwargs) -> None:
        """AdamW's decoupled weight decay on the trainable elements only, in torch's expression and order."""
        self._stashed = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                decay = group.get("weight_decay", 0.0)
                entries = [self._tensors.get(id(p)) for p in group["params"]]
                if not decay or all(e is None or e.trainable is None for e in entries):
                    continue
                factor = 1 - group["lr"] * decay
                for param, entry in zip(group["params"], entries):
                    if param.grad is None:  # torch skips a parameter without a gradient entirely
                        continue
                    if entry is None or entry.trainable is None:
                        param.mul_(factor)
                        continue
                    flat = param.view(-1)
                    for start, stop in entry.trainable:
                        flat[start:stop].mul_(factor)
                group["weight_decay"] = 0.0
                self._stashed.append((group, decay))

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, decay in self._stashed:
            group["weight_decay"] = decay
        self._stashed = []
