"""DES-MoE's three training phases as trainable sets of the slice-exact gradient mask.

The paper trains in three phases (by default at 0.2 and 0.7 of the run): **I** the router and the backbone, **II**
the router and the domains' experts, **III** the domains' experts only. Phase I follows the paper's equation (the
experts frozen while the adaptive router settles under distillation); its figure caption lists the experts as
trained in phase I too, so what each phase trains is configuration (``phase_parts``, from ``router``, ``backbone``,
``experts``: :data:`connito.adaptation.des_moe.config.PARTS`), the equation's sets the default.

A phase is a :class:`connito.training.trainable_set.TrainableSet`:

* ``router``: ``routers=True`` (each MoE layer's router module: the pretrained linear weight and the adaptive MLP);
* ``backbone``: every parameter that is neither a routed expert nor in a router, by exact name; it is the union of
  four finer parts a phase can name instead: ``embeddings`` (the input embedding and the LM head), ``attention``
  (everything under a layer's attention module, its q/k norms included), ``norms`` (the layers' and the final
  normalisation weights) and ``mlp`` (the rest: dense layers' MLPs, shared experts and their gates);
* ``experts``: the routed experts that some active domain's row of the expert-domain map allows, every routed expert
  before the first map.

The engine is built with the union of all phases (what no phase trains has no gradient and no optimizer state:
:func:`connito.training.grad_masks.freeze_untrainable`), and the gradient mask narrows to the current phase with
:meth:`connito.training.grad_masks.GradientMask.set_trainable`, which zeroes the first moments of what leaves the
set: a frozen part is moved by neither weight decay nor stale momentum, and stays bit-identical while frozen.
Phase i runs over the optimizer steps ``[round(end_{i-1} * steps), round(end_i * steps))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from connito.experts import ExpertMask, ExpertView
from connito.training.trainable_set import TrainableSet


@dataclass(frozen=True)
class PhasePlan:
    """Phase boundaries in optimizer steps and what each phase trains."""

    starts: tuple[int, ...]
    """First step of phases 2, 3, ... (0-based optimizer steps)."""
    parts: tuple[frozenset[str], ...]

    @classmethod
    def from_fractions(cls, ends: Sequence[float], parts: Sequence[Sequence[str]], steps: int) -> PhasePlan:
        return cls(tuple(round(e * steps) for e in ends), tuple(frozenset(p) for p in parts))

    def phase_at(self, step: int) -> int:
        """The phase (0-based) that optimizer step ``step`` (0-based) belongs to."""
        return sum(step >= start for start in self.starts)

    def union(self) -> frozenset[str]:
        return frozenset().union(*self.parts)


BACKBONE_PARTS = ("embeddings", "attention", "norms", "mlp")
"""The parts ``backbone`` is the union of, in the order a parameter is classified (first match wins)."""

_ATTENTION_SEGMENTS = {"self_attn", "attn", "attention", "self_attention"}


def backbone_names(model: nn.Module, view: ExpertView) -> tuple[str, ...]:
    """Names of every parameter of ``model`` that is neither a stacked routed-expert tensor nor in a router module."""
    excluded = {id(piece.param) for piece in view.expert_param_slices()}
    for _, block in view.blocks():
        excluded |= {id(p) for p in block.router_module.parameters()}
    return tuple(name for name, param in model.named_parameters() if id(param) not in excluded)


def backbone_parts(model: nn.Module, view: ExpertView) -> dict[str, tuple[str, ...]]:
    """:func:`backbone_names` split into :data:`BACKBONE_PARTS`: every backbone parameter is in exactly one part.

    ``embeddings``: the parameters of ``get_input_embeddings()`` and ``get_output_embeddings()`` (one, when tied);
    ``attention``: a parameter whose dotted path has a segment ``self_attn``/``attn``/``attention``; ``norms``: a
    parameter of a module whose class name contains ``Norm``; ``mlp``: every other backbone parameter.
    """
    embedding_ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            embedding_ids |= {id(p) for p in module.parameters()}
    norm_ids = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    params = dict(model.named_parameters())
    parts: dict[str, list[str]] = {part: [] for part in BACKBONE_PARTS}
    for name in backbone_names(model, view):
        pid = id(params[name])
        if pid in embedding_ids:
            parts["embeddings"].append(name)
        elif _ATTENTION_SEGMENTS & set(name.split(".")[:-1]):
            parts["attention"].append(name)
        elif pid in norm_ids:
            parts["norms"].append(name)
        else:
            parts["mlp"].append(name)
    return {part: tuple(names) for part, names in parts.items()}


def trainable_set(
    parts: frozenset[str], view: ExpertView, experts_LE: torch.Tensor | None, backbone: dict[str, tuple[str, ...]]
) -> TrainableSet:
    """The :class:`TrainableSet` of ``parts``; ``experts_LE`` [L, E] bool over ``view.moe_layers`` (the experts the
    map allows; None: every routed expert); ``backbone``: :func:`backbone_parts` of the model."""
    experts = view.empty_mask()
    if "experts" in parts:
        if experts_LE is None:
            experts = ExpertMask.full(view.num_layers, view.num_experts, view.moe_layers)
        else:
            mask_LE = experts.mask_LE
            mask_LE[view.moe_layers] = experts_LE.to("cpu", dtype=mask_LE.dtype)
            experts = ExpertMask(mask_LE, view.moe_layers)
    named = BACKBONE_PARTS if "backbone" in parts else [p for p in BACKBONE_PARTS if p in parts]
    modules = tuple(name for part in named for name in backbone[part])
    return TrainableSet(experts, routers="router" in parts, modules=modules)
