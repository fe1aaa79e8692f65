"""Observe every MoE layer's routing decision with forward hooks, for plain transformers routers and AutoEP's.

One :class:`RouterObserver` per model hooks each MoE layer's router once; consumers subscribe and unsubscribe::

    observer = RouterObserver(model)
    subscription = observer.subscribe(lambda record: counts[record.layer].add_(...))
    model(input_ids)            # one RoutingRecord per MoE layer per forward, in layer order
    subscription.remove()

A :class:`RoutingRecord` carries what the family's routing actually did, as the family routes: the router logits
[T, E] (``hidden_TH @ router_weight_EH.T``, before softmax or sigmoid), and the experts each token used with the
weights its output was scaled by [T, K] (softmax or sigmoid scoring, top-k renormalisation, group-limited choice,
DeepSeek's routed scaling factor; DeepSeek-V3's choice bias picks experts but does not weight them). Both
layouts report the same thing:

* transformers ``<Family>TopKRouter`` modules return ``(logits, weights, ids)``: one hook on the router;
* AutoEP's ``TokenChoiceTopKRouter`` returns ``(weights, ids, tokens per expert)`` and computes its logits with
  its ``gate`` ``nn.Linear``: a hook on each, the gate's logits paired with the router's decision.

The hooks return nothing, so observing never changes an output. Records hold the live tensors (gradients flow
through ``logits_TE``, which the load-balancing loss needs): a consumer that keeps them past the forward detaches
them. Without subscribers the hooks do no work.

Shape legend: T tokens of the forward (B x S), E routed experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock


@dataclass(frozen=True)
class RoutingRecord:
    layer: int
    """Decoder layer index (global numbering, dense layers counted)."""
    logits_TE: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    """The weight each chosen expert's output is multiplied by in the block."""


Consumer = Callable[[RoutingRecord], None]


class Subscription:
    def __init__(self, observer: RouterObserver, key: int):
        self._observer, self._key = observer, key

    def remove(self) -> None:
        self._observer._consumers.pop(self._key, None)


class RouterObserver:
    """Forward hooks on every MoE router of ``model``; call :meth:`close` to take them off."""

    def __init__(self, model: nn.Module, view: ExpertView | None = None):
        self.view = view or ExpertView(model)
        self._consumers: dict[int, Consumer] = {}
        self._next_key = 0
        self._pending_logits: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer, block in self.view.blocks():
            if isinstance(block, HFMoEBlock):
                self._handles.append(block.router_module.register_forward_hook(self._hf_hook(layer)))
            else:
                router = block.router_module
                self._handles.append(router.gate.register_forward_hook(self._gate_hook(layer)))
                self._handles.append(router.register_forward_hook(self._autoep_hook(layer)))

    def subscribe(self, consumer: Consumer) -> Subscription:
        """Call ``consumer(record)`` for every MoE layer of every forward from now on."""
        key, self._next_key = self._next_key, self._next_key + 1
        self._consumers[key] = consumer
        return Subscription(self, key)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._consumers.clear()

    def _emit(self, record: RoutingRecord) -> None:
        for consumer in list(self._consumers.values()):
            consumer(record)

    def _hf_hook(self, layer: int):
        def hook(module, args, output) -> None:
            if self._consumers:
                logits_TE, weights_TK, ids_TK = output
                self._emit(RoutingRecord(layer, logits_TE, ids_TK, weights_TK))

        return hook

    def _gate_hook(self, layer: int):
        def hook(module, args, output) -> None:
            if self._consumers:
                self._pending_logits[layer] = output

        return hook

    def _autoep_hook(self, layer: int):
        def hook(module, args, output) -> None:
            if self._consumers:
                weights_TK, ids_TK = output[0], output[1]
                self._emit(RoutingRecord(layer, self._pending_logits.pop(layer), ids_TK, weights_TK))

        return hook
