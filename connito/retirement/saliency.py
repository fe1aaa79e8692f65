"""REAP saliency (Lasby et al. 2025, *REAP: Router-weighted Expert Activation Pruning*, CerebrasResearch/reap):
how much each routed expert adds to its layer's output on calibration text, for one-shot pruning
(``connito prune score=reap``)::

    saliency[l, e] = mean over the calibration tokens x routed to expert e of layer l of  g_e(x) * ||f_e(x)||_2

* **routed to e**: e is among the token's top-k experts, as the model routes (every family's own rule, through
  :class:`~connito.routing.RouterObserver`);
* ``g_e(x)``: the weight the block multiplies expert e's output by for that token (the record's
  ``topk_weights_TK``: softmax or sigmoid score, renormalised over the top-k where the family does, DeepSeek's
  routed scaling factor included), i.e. REAP's router gate value as this model applies it;
* ``f_e(x) = down_e(act(gate_e x) * up_e x)``: the expert's output before that weight, recomputed from the
  expert's weights (:meth:`ExpertView.read_expert`, transformers form, gate rows first) and the block's activation,
  on the router's input (the hidden states the experts receive), in the model's dtype; the norm and the mean are
  accumulated in float64.

An expert no calibration token was routed to scores **0** (REAP's mean is undefined there; 0 says "no evidence it
contributes anything on this workload", so it is pruned first, as by usage). Tokens whose domain id is negative
(padding) are left out. Expert-parallel AutoEP layers are refused: measure the transformers checkpoint.

Shape legend: L MoE layers (index i is ``view.moe_layers[i]``), E routed experts, T tokens of one forward (B x S),
K experts per token, H hidden size, I expert FFN width, N (token, expert) pairs routed to one expert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock
from connito.models.families import ModelError
from connito.routing import RouterObserver, RoutingRecord


class SaliencyError(ModelError):
    """A model or input REAP saliency cannot be measured on; the message names the fix."""


@dataclass(frozen=True)
class Saliency:
    moe_layers: list[int]
    saliency_LE: torch.Tensor
    """REAP saliency (float64); 0 for an expert no token was routed to."""
    routed_LE: torch.Tensor
    """Calibration tokens routed to each expert (float64 counts)."""
    tokens: int
    """Calibration tokens measured (padding left out)."""


class SaliencyMeter:
    """Hooks that accumulate REAP saliency over every forward of ``model`` until :meth:`close`.

    A forward pre-hook on each MoE router keeps the router's input; the :class:`RouterObserver` record of the
    same layer pairs it with the routing decision, and the routed experts' outputs are recomputed from their
    weights (read once, here). Call :meth:`set_tokens` before each forward to leave padding out."""

    def __init__(self, model: nn.Module, view: ExpertView | None = None):
        self.view = view or ExpertView(model)
        self._index = {layer: i for i, layer in enumerate(self.view.moe_layers)}
        shape = (len(self._index), self.view.num_experts)
        self.weighted_sum_LE = torch.zeros(shape, dtype=torch.float64)
        self.routed_LE = torch.zeros(shape, dtype=torch.float64)
        self.tokens = 0
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor, nn.Module]] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._keep_T: torch.Tensor | None = None
        self._handles = []
        for layer, block in self.view.blocks():
            if not isinstance(block, HFMoEBlock):
                raise SaliencyError(
                    f"layer {layer} is an expert-parallel AutoEP layer: measure REAP saliency on the transformers "
                    "model (parallel.ep_size=1, or the exported checkpoint)"
                )
            act_fn = getattr(block.experts_module, "act_fn", None)
            if act_fn is None:
                raise SaliencyError(
                    f"{block.prefix}: the experts module has no act_fn, so expert outputs cannot be recomputed"
                )
            tensors = [self.view.read_expert((layer, e)) for e in range(block.num_experts)]
            gate_up_EIH = torch.stack([t["gate_up_proj"] for t in tensors])
            down_EHI = torch.stack([t["down_proj"] for t in tensors])
            self._experts[layer] = (gate_up_EIH, down_EHI, act_fn)
            self._handles.append(
                block.router_module.register_forward_pre_hook(self._keep_input(layer), with_kwargs=True)
            )
        self._observer = RouterObserver(model, self.view)
        self._observer.subscribe(self._consume)

    def set_tokens(self, keep_T: torch.Tensor | None) -> None:
        """Which tokens of the NEXT forward count (bool [T], B x S flattened row-major); None: all of them."""
        self._keep_T = None if keep_T is None else keep_T.detach().reshape(-1).to("cpu", torch.bool)

    def result(self) -> Saliency:
        saliency_LE = self.weighted_sum_LE / self.routed_LE.clamp_min(1.0)
        return Saliency(list(self.view.moe_layers), saliency_LE, self.routed_LE.clone(), self.tokens)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._observer.close()

    def _keep_input(self, layer: int):
        def hook(module, args, kwargs) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._hidden[layer] = hidden.detach()

        return hook

    @torch.no_grad()
    def _consume(self, record: RoutingRecord) -> None:
        hidden = self._hidden.pop(record.layer)
        gate_up_EIH, down_EHI, act_fn = self._experts[record.layer]
        hidden_TH = hidden.reshape(-1, gate_up_EIH.shape[-1])
        ids_TK, weights_TK = record.topk_ids_TK.detach(), record.topk_weights_TK.detach()
        T, K = ids_TK.shape
        keep_T = torch.ones(T, dtype=torch.bool) if self._keep_T is None else self._keep_T
        if keep_T.shape[0] != T:
            raise SaliencyError(
                f"layer {record.layer} routed {T} tokens but set_tokens gave {keep_T.shape[0]}: give one flag per "
                "token of the next forward"
            )
        index = self._index[record.layer]
        if index == 0:
            self.tokens += int(keep_T.sum())
        token_N = torch.arange(T).repeat_interleave(K)
        expert_N, weight_N = ids_TK.reshape(-1).cpu(), weights_TK.reshape(-1)
        counted_N = keep_T[token_N] & (expert_N >= 0) & (expert_N < gate_up_EIH.shape[0])
        for expert in expert_N[counted_N].unique().tolist():
            pick_N = counted_N & (expert_N == expert)
            x_NH = hidden_TH[token_N[pick_N].to(hidden_TH.device)]
            gate_NI, up_NI = nn.functional.linear(x_NH, gate_up_EIH[expert]).chunk(2, dim=-1)
            out_NH = nn.functional.linear(act_fn(gate_NI) * up_NI, down_EHI[expert])
            norm_N = out_NH.double().norm(dim=-1).cpu()
            self.weighted_sum_LE[index, expert] += (weight_N[pick_N.to(weight_N.device)].double().cpu() * norm_N).sum()
            self.routed_LE[index, expert] += float(pick_N.sum())
        if index == len(self._index) - 1:
            self._keep_T = None  # used up: the next forward sets its own


@torch.no_grad()
def reap_saliency(
    model: nn.Module, batches: Iterable[torch.Tensor], domain_ids: Iterable[torch.Tensor] | None = None
) -> Saliency:
    """REAP saliency of every routed expert of ``model`` over ``batches`` (input ids [B, S] each); tokens whose
    ``domain_ids`` entry is negative (padding) are left out. The model is run in eval mode, without a KV cache, and
    left unchanged (hooks removed)."""
    batches = list(batches)
    domains = [None] * len(batches) if domain_ids is None else list(domain_ids)
    if not batches or len(domains) != len(batches):
        raise SaliencyError(
            f"REAP saliency needs calibration batches, one domain-id tensor each: got {len(batches)} batches and "
            f"{len(domains)} domain-id tensors"
        )
    meter = SaliencyMeter(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for input_BS, domain_BS in zip(batches, domains):
            meter.set_tokens(None if domain_BS is None else domain_BS >= 0)
            model(input_ids=input_BS.to(device), use_cache=False)
    finally:
        meter.close()
        model.train(was_training)
    return meter.result()
