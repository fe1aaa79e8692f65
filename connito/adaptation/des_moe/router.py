"""DES-MoE's Adaptive Lightweight Router on a transformers MoE model, identical to the pretrained router at start.

The paper's router is an MLP ``W2 GELU(W1 h + b1) + b2`` (hidden 4d) whose W2 is "initialised by copying the
pretrained router". That cannot reproduce the pretrained routing: W2 is [E, 4d] and acts on ``GELU(W1 h + b1)``,
not on h, so no copy of the [E, d] router makes the MLP equal ``W h``. Connito keeps the pretrained linear router and
adds the MLP as a residual whose output layer starts at zero::

    logits_TE = h_TH @ W_EH.T  +  (GELU(h_TH @ W1.T + b1) @ W2.T + b2)        W2 = 0, b2 = 0 at the start

so at initialisation the adaptive logits are the pretrained logits bit for bit (adding an exact zero), and the
routing, the model's output and its loss are those of the pretrained model. The MLP still learns from the first
step (W2's gradient is ``dL/dlogits x GELU(W1 h + b1)``, not zero; W1's follows once W2 moved), as a zero-initialised
LoRA branch does. Both parts train whenever the router trains (a phase naming ``router``); W is the family's own
router weight, so the HF export keeps its name and shape.

How it plugs in: the MLP becomes a child module ``adapter`` of the family's router module (parameter names
``<block>.gate.adapter.up.weight`` ...), and a forward hook on the router (prepended, like
:mod:`connito.routing.edits`, so router observation records the adapted routing) adds the MLP's output to the
router's logits and routes them again with the family's own rule (:func:`connito.routing.edits.routing_rule`:
softmax or sigmoid, top-k, renormalisation, groups, scaling, DeepSeek-V3's choice bias, bit for bit as the family
routes). The router therefore returns ``(adapted logits, weights, ids)`` as before, and the block, transformers'
load-balancing loss and the observers see the adapted routing. The model is the transformers model with one more
child per router; :meth:`AdaptiveRouters.remove` takes both off.

While ``capture`` is on and autograd records (a training forward), the hook keeps each MoE layer's router input
and adapted logits for the distillation term (:mod:`connito.adaptation.des_moe.distill`), which takes them after the
forward. Only transformers blocks (``parallel.ep_size=1``): AutoEP rebuilds its routers from the gate weight alone.

Shape legend: T tokens of the forward (B x S), H hidden size, E routed experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock
from connito.routing.edits import routing_rule

ADAPTER = "adapter"
"""The name of the MLP inside the family's router module."""


class RouterAdapter(nn.Module):
    """``down(GELU(up(h)))``: ``up`` [mult * H, H] with bias (Kaiming-uniform weight, zero bias), ``down``
    [E, mult * H] with bias, both zero, so the output is exactly 0 until ``down`` has trained."""

    def __init__(self, hidden_size: int, num_experts: int, hidden_mult: int, generator: torch.Generator):
        super().__init__()
        self.up = nn.Linear(hidden_size, hidden_mult * hidden_size)
        self.down = nn.Linear(hidden_mult * hidden_size, num_experts)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.up.weight, a=math.sqrt(5), generator=generator)
            self.up.bias.zero_()
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(hidden_TH)))

    def is_zero(self) -> bool:
        """True while the output layer is exactly zero: the adaptive router equals its linear part."""
        return not bool(self.down.weight.any()) and not bool(self.down.bias.any())


@dataclass(frozen=True)
class RouterCapture:
    """One MoE layer's router input and adapted logits in a training forward (live tensors, in the graph)."""

    layer: int
    hidden_TH: torch.Tensor
    logits_TE: torch.Tensor


class AdaptiveRouters:
    """The adaptive router on every MoE layer of ``model`` (transformers blocks); see the module docstring.

    ``teacher_weights`` holds copies of the router weights at installation (the pretrained routers: install before
    training). ``adapters`` maps layer -> :class:`RouterAdapter`."""

    def __init__(self, model: nn.Module, hidden_mult: int = 4, seed: int = 0, view: ExpertView | None = None):
        self.view = view or ExpertView(model)
        self.capture = False
        self.calibrating = False
        self._captures: list[RouterCapture] = []
        self.adapters: dict[int, RouterAdapter] = {}
        self.teacher_weights: dict[int, torch.Tensor] = {}
        self._handles = []
        generator = torch.Generator().manual_seed(seed)
        for layer, block in self.view.blocks():
            if not isinstance(block, HFMoEBlock):
                raise ValueError(
                    f"the adaptive router plugs into transformers MoE blocks; layer {layer} is {type(block).__name__} "
                    "(expert parallelism). Install it on the transformers model before deepspeed.initialize, with "
                    "parallel.ep_size=1"
                )
            routing_rule(self.view, layer)  # a family without a routing rule stops here
            router = block.router_module
            if hasattr(router, ADAPTER):
                raise ValueError(f"{block.prefix} already has an adaptive router ('{ADAPTER}')")
            weight = block.router_weight()
            adapter = RouterAdapter(weight.shape[1], weight.shape[0], hidden_mult, generator)
            adapter.to(device=weight.device, dtype=weight.dtype)
            router.add_module(ADAPTER, adapter)
            self.adapters[layer] = adapter
            self.teacher_weights[layer] = weight.detach().clone()
            self._handles.append(router.register_forward_hook(self._hook(layer, adapter), prepend=True))

    @property
    def hidden_mult(self) -> int:
        adapter = next(iter(self.adapters.values()))
        return adapter.up.out_features // adapter.up.in_features

    def take_captures(self) -> list[RouterCapture]:
        """The captures of the forwards since the last call (and forget them)."""
        captures, self._captures = self._captures, []
        return captures

    def remove(self) -> None:
        """Take the hooks and the MLPs off: the routers are the family's linear routers again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer, block in self.view.blocks():
            if layer in self.adapters:
                delattr(block.router_module, ADAPTER)
        self.adapters.clear()
        self._captures.clear()

    def _hook(self, layer: int, adapter: RouterAdapter):
        def hook(module, args, output):
            logits_TE, weights_TK, ids_TK = output
            hidden_TH = args[0].reshape(-1, args[0].shape[-1])
            adapted_TE = logits_TE + adapter(hidden_TH.to(adapter.up.weight.dtype)).to(logits_TE.dtype)
            new_weights_TK, new_ids_TK = routing_rule(self.view, layer).route(adapted_TE)
            if (self.capture and torch.is_grad_enabled()) or self.calibrating:
                self._captures.append(RouterCapture(layer, hidden_TH, adapted_TE))
            return adapted_TE, new_weights_TK.to(weights_TK.dtype), new_ids_TK

        return hook
