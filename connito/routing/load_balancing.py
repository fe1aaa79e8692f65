"""The load-balancing loss where transformers cannot compute it: a consumer of router observation.

transformers computes the Switch-style loss of most families itself (``outputs.aux_loss`` with
``output_router_logits=True``), also after AutoEP's presets swapped the blocks (they retarget transformers'
router-logit recorder). AutoEP's custom-pattern path (OLMoE, FlexOlmo: no preset in deepspeed 0.19.8) does not:
after the swap ``outputs.router_logits`` would be an empty tuple and the loss would be lost. For those models
:class:`LoadBalancingLoss` collects the router logits of each forward from a :class:`RouterObserver` and calls the
family's own transformers function (``Family.load_balancing_loss``) on them, over this rank's tokens, exactly as
transformers does per forward at ``parallel.ep_size=1``; a pre-hook on the model starts each forward's collection
and asks transformers not to record (``output_router_logits=False``). Connito passes no attention mask (packed
rows), so the masked branch of that function does not apply.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from connito.experts import ExpertView, family_of
from connito.experts.blocks import HFMoEBlock
from connito.models.families import Family
from connito.routing.observer import RouterObserver, RoutingRecord


def transformers_loss_function(family: Family):
    module, name = family.load_balancing_loss.split(":")
    return getattr(importlib.import_module(module), name)


def needs_observed_loss(model: nn.Module) -> bool:
    """True when the model asked for the load-balancing loss but transformers will not compute it: AutoEP's
    custom-pattern layers replaced the family's routers."""
    family = family_of(model)
    if not family.has_aux_loss or not getattr(model.config, "output_router_logits", False):
        return False
    if family.autoep is None or family.autoep.pattern is None:
        return False
    view = ExpertView(model)
    return any(not isinstance(block, HFMoEBlock) for _, block in view.blocks())


class LoadBalancingLoss:
    """The family's transformers load-balancing loss over the router logits of the model's last forward."""

    def __init__(self, model: nn.Module, observer: RouterObserver):
        self.family = family_of(model)
        self._function = transformers_loss_function(self.family)
        self.num_experts, self.top_k = observer.view.num_experts, observer.view.top_k
        self._logits: list[torch.Tensor] = []
        self._subscription = observer.subscribe(self._record)
        self._handle = model.register_forward_pre_hook(self._start, with_kwargs=True)

    def _start(self, module, args, kwargs):
        self._logits.clear()
        return args, {**kwargs, "output_router_logits": False}

    def _record(self, record: RoutingRecord) -> None:
        self._logits.append(record.logits_TE)

    def compute(self) -> torch.Tensor | None:
        """The loss of the last forward (its captures are consumed), or None when it ran no MoE layer."""
        logits, self._logits = self._logits, []
        if not logits:
            return None
        return self._function(tuple(logits), self.num_experts, self.top_k)

    def remove(self) -> None:
        self._subscription.remove()
        self._handle.remove()
