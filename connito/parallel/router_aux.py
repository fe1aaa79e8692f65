"""The load-balancing loss of expert-parallel families whose router logits transformers no longer sees.

For a family AutoEP serves through its custom-pattern path (OLMoE, FlexOlmo), AutoEP's default preset adapter does
not retarget transformers' router-logit recorder (``OutputRecorder(OlmoeTopKRouter, index=0)``) to the router that
replaced the family's: after the swap ``outputs.router_logits`` would be an empty tuple and ``outputs.aux_loss``
would be lost (transformers' ``load_balancing_loss_func`` cannot even take an empty tuple). Connito observes the
logits instead: a forward hook on each ``AutoEPMoELayer``'s ``router.gate`` (the ``nn.Linear`` whose output is
exactly the family's ``router_logits`` [T, E], ``F.linear(hidden, weight)``), and a pre-hook on the model that
starts a fresh capture per forward and asks transformers not to record (``output_router_logits=False``).

:func:`aux_loss` returns the loss for the model's last forward: the family's own formula
(``load_balancing_loss_func`` in transformers' ``modeling_olmoe``) over every MoE layer of that forward, on this
rank's tokens only, as transformers computes it per forward at ``parallel.ep_size=1``. Connito passes no attention
mask (packed rows), so the masked branch of that function does not apply.

Shapes: T tokens of the forward (B x S), E routed experts, K experts per token.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from connito.parallel.expert_parallel import AUTOEP_FAMILIES, autoep_layers

_RECORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_balancing_loss(logits_per_layer: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style loss ``E * sum_e f_e * P_e`` over all layers' rows, as transformers' OLMoE computes it: f_e
    the share of top-k assignments to expert e (sums to K), P_e its mean softmax probability."""
    device = logits_per_layer[0].device
    tokens_per_expert_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    router_prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total_rows = 0.0
    for logits_TE in logits_per_layer:
        probs_TE = torch.nn.functional.softmax(logits_TE, dim=-1)
        _, selected_TK = torch.topk(probs_TE, top_k, dim=-1)
        tokens_per_expert_sum = (
            tokens_per_expert_sum + torch.bincount(selected_TK.reshape(-1), minlength=num_experts).float()
        )
        router_prob_sum = router_prob_sum + probs_TE.float().sum(dim=0)
        total_rows = total_rows + probs_TE.shape[0]
    tokens_per_expert = tokens_per_expert_sum / total_rows
    router_prob_per_expert = router_prob_sum / total_rows
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts


class RouterAuxLoss:
    """Captures the router logits of every AutoEP layer of ``model`` per forward (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        first = next(iter(layers.values()))
        self.num_experts, self.top_k = first.num_experts, first.top_k
        if any((layer.num_experts, layer.top_k) != (self.num_experts, self.top_k) for layer in layers.values()):
            raise ValueError("Connito's load-balancing loss expects the same experts and top-k in every MoE layer")
        self._model = weakref.ref(model)
        self._logits: list[torch.Tensor] = []
        self._handles = [model.register_forward_pre_hook(self._start, with_kwargs=True)]
        self._handles += [layer.router.gate.register_forward_hook(self._record) for layer in layers.values()]

    def _start(self, module, args, kwargs):
        self._logits.clear()
        return args, {**kwargs, "output_router_logits": False}

    def _record(self, module, args, output) -> None:
        self._logits.append(output)

    def loss(self) -> torch.Tensor | None:
        """The loss of the last forward (its captures are consumed), or None when it ran no MoE layer."""
        logits, self._logits = self._logits, []
        return load_balancing_loss(logits, self.num_experts, self.top_k) if logits else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        model = self._model()
        if model is not None and _RECORDERS.get(model) is self:
            del _RECORDERS[model]


def attach(model: nn.Module) -> RouterAuxLoss | None:
    """Install the capture on an AutoEP-replaced model whose family needs it and asked for the loss
    (``config.output_router_logits``, set by Connito when ``model.aux_loss_coef > 0``); None otherwise."""
    config = getattr(model, "config", None)
    family = AUTOEP_FAMILIES.get(getattr(config, "model_type", None))
    layers = autoep_layers(model)
    if family is None or family.custom is None or not layers or not getattr(config, "output_router_logits", False):
        return None
    recorder = RouterAuxLoss(model, layers)
    _RECORDERS[model] = recorder
    return recorder


def aux_loss(model: nn.Module, outputs) -> torch.Tensor | None:
    """The load-balancing loss of ``model``'s last forward: Connito's when :func:`attach` installed a capture,
    else the family's own ``outputs.aux_loss`` (None when it computes none)."""
    recorder = _RECORDERS.get(model)
    return recorder.loss() if recorder is not None else getattr(outputs, "aux_loss", None)
