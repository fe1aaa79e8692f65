"""Put :class:`LeanSlots` into a transformers model for a mask of trainable experts, and bind them to the live
experts modules (the transformers ones, or AutoEP's after it replaced the blocks).

:func:`install` runs on the transformers model before the DeepSpeed engine is built (so the optimizer is built on
the slots): for each MoE layer with some but not all experts trainable it adds ``<layer>.lean_experts`` holding
this rank's trainable experts, freezes the fused tensors and switches the model's experts implementation to
Connito's (``config._experts_implementation = "connito_lean"``, which runs transformers' own ``grouped_mm`` path
for a layer without slots). A layer whose experts all train keeps its fused tensors trainable (nothing to save);
a layer with none trains no expert. :func:`bind_autoep` runs after ``deepspeed.initialize`` under expert
parallelism: it turns each AutoEP layer's ``experts`` module into a ``LeanGroupedExperts``
(:func:`connito.experts.lean.forward.lean_grouped_experts_class`: the same module and parameters, a subclass whose
forward computes through the slots, as ``torch.nn.utils.parametrize`` swaps a module's class).

Shape legend: L decoder layers, E routed experts, G slots, N expert-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from connito.experts.addressing import ExpertMask
from connito.experts.blocks import AutoEPMoEBlock, HFMoEBlock
from connito.experts.lean.slots import LEAN_ATTR, LeanSlots, attach_model_hooks, lean_slots
from connito.experts.view import ExpertView

EXPERTS_IMPLEMENTATION = "connito_lean"


class LeanExpertsError(ValueError):
    """A model or layout lean experts cannot serve; the message names the fix."""


@dataclass(frozen=True)
class LeanReport:
    layers: list[int]
    """MoE layers whose trainable experts live in slots."""
    slots: int
    """Slots on this rank, padding included."""
    slot_numel: int
    """Trainable expert elements on this rank (padding included)."""


def _parent(model: nn.Module, prefix: str) -> nn.Module:
    return model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model


def install(model: nn.Module, mask: ExpertMask, ep_size: int = 1, ep_rank: int = 0) -> LeanReport:
    """Slots for the experts of ``mask`` (global ids) that this expert-parallel rank will hold; see the module
    docstring. Install once per model: a layer that already has slots is refused."""
    from connito.experts.lean import forward  # registers the experts implementation

    view = ExpertView(model)
    mask_LE = mask.mask_LE
    per_rank = view.num_experts // ep_size
    local = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    layers, slots_total, numel = [], 0, 0
    for layer, block in view.blocks():
        if not isinstance(block, HFMoEBlock):
            raise LeanExpertsError(
                f"lean experts are installed on the transformers model before DeepSpeed replaces its blocks; "
                f"{block.prefix} is already an expert-parallel layer"
            )
        row_E = mask_LE[layer]
        if not row_E.any() or row_E.all():
            continue
        experts_module = block.experts_module
        if not forward.supports(experts_module):
            raise LeanExpertsError(
                f"{block.prefix}.{block.layout.experts_attr} ({type(experts_module).__name__}) is not a gated, "
                "untransposed, bias-free fused experts module; train it with the mask-only path "
                "(callbacks.trainable.lean=false)"
            )
        parent = _parent(model, block.prefix)
        if hasattr(parent, LEAN_ATTR):
            raise LeanExpertsError(f"layer {layer} already has lean experts")
        counts = [int(row_E[r * per_rank : (r + 1) * per_rank].sum()) for r in range(ep_size)]
        width = max(counts)
        mine = [e for e in local if row_E[e]]
        fused = block.stacked_params()
        gate_up, down = fused["gate_up_proj"], fused["down_proj"]
        with torch.no_grad():
            gate_up_G = gate_up.new_zeros((width,) + tuple(gate_up.shape[1:]))
            down_G = down.new_zeros((width,) + tuple(down.shape[1:]))
            if mine:
                gate_up_G[: len(mine)] = gate_up[mine]
                down_G[: len(mine)] = down[mine]
        slots = LeanSlots(
            layer, local, mine + [-1] * (width - len(mine)), [e - local.start for e in mine], gate_up_G, down_G
        )
        if ep_size > 1:  # expert parameters to DeepSpeed: reduced over the expert-data-parallel group only
            for param in slots.parameters():
                param.allreduce = False
                param.group_name = f"ep_size_{ep_size}"
        gate_up.requires_grad_(False)
        down.requires_grad_(False)
        parent.add_module(LEAN_ATTR, slots)
        if ep_size == 1:
            slots.bind(experts_module, fused)
        layers.append(layer)
        slots_total += width
        numel += slots.gate_up_proj.numel() + slots.down_proj.numel()
    if layers:
        model.config._experts_implementation = EXPERTS_IMPLEMENTATION
        model._connito_lean_hooks = attach_model_hooks(model)
    return LeanReport(layers, slots_total, numel)


def bind_autoep(model: nn.Module) -> None:
    """After AutoEP replaced the blocks: wrap each replaced layer's experts module so it computes through the slots,
    and check that AutoEP put on this rank the experts the slots were made for."""
    from connito.experts.lean.forward import lean_grouped_experts_class

    by_layer = {slots.layer: slots for slots in lean_slots(model)}
    if not by_layer:
        return
    for layer, block in ExpertView(model).blocks():
        slots = by_layer.get(layer)
        if slots is None:
            continue
        if not isinstance(block, AutoEPMoEBlock):  # a transformers block: bound when the slots were installed
            continue
        held = set(block.local_experts)
        stray = [e for e in slots.global_ids if e >= 0 and e not in held]
        if stray:
            raise LeanExpertsError(
                f"layer {layer}: the slots hold experts {stray} but AutoEP placed experts "
                f"{block.local_experts.start}..{block.local_experts.stop - 1} on this rank (ep rank {block.ep_rank}); "
                "the slots were built for another expert-parallel rank"
            )
        experts = block.module.experts
        lean_grouped_experts_class().adopt(experts)
        slots.bind(experts, block.stacked_params())


def lean_layers(model: nn.Module) -> dict[int, LeanSlots]:
    return {slots.layer: slots for slots in lean_slots(model)}
