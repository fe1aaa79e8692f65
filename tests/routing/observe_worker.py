"""Router observation checked against the blocks' own outputs, in any layout: the routing half of the view worker
(``tests/experts/view_worker.py`` calls :func:`routing_report` on every rank under torchrun) and of the
single-process tests of ``test_routing_observer.py``.

:func:`routing_report` runs one forward with a :class:`RouterObserver` subscribed and, for every MoE layer, returns
what was observed next to what it must equal: the captured logits against ``hidden_TH @ router_weight_EH.T``, the
block's output against the recombination ``sum_k w_k * expert_{id_k}(x) (+ the shared expert path)`` of the
captured ids and weights with the experts ``ExpertView.read_expert`` gives, and the captured ids and weights against
the family's routing rule applied to the captured logits. The test asserts on the returned tensors.

Shape legend: T tokens (B x S), H hidden size, E routed experts, K experts per token, I expert FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from connito.experts import ExpertView
from connito.routing import RouterObserver, RoutingRecord


def read_all_experts(view: ExpertView) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Every expert of every MoE layer, in the same order on every rank (``read_expert`` is a collective)."""
    return {(layer, e): view.read_expert((layer, e)) for layer in view.moe_layers for e in range(view.num_experts)}


def swiglu_expert(x_TH: torch.Tensor, expert: dict[str, torch.Tensor]) -> torch.Tensor:
    """``down @ (silu(gate @ x) * (up @ x))`` with ``gate_up_proj`` [2I, H] (gate rows first), ``down_proj`` [H, I]."""
    gate_IH, up_IH = expert["gate_up_proj"].chunk(2, dim=0)
    return (F.silu(x_TH @ gate_IH.T) * (x_TH @ up_IH.T)) @ expert["down_proj"].T


def recombine(
    view: ExpertView,
    layer: int,
    x_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    experts: dict[tuple[int, int], dict[str, torch.Tensor]],
) -> torch.Tensor:
    """The block's output rebuilt from the observed routing: routed experts plus the shared expert path."""
    out_TH = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(ids_TK.shape[1]):
            expert = experts[(layer, int(ids_TK[t, k]))]
            out_TH[t] += weights_TK[t, k].to(x_TH.dtype) * swiglu_expert(x_TH[t : t + 1], expert)[0]
    shared = view.shared_experts(layer)
    if shared is not None:
        shared_TH = shared(x_TH)
        gate = view.shared_expert_gate(layer)
        if gate is not None:
            shared_TH = torch.sigmoid(gate(x_TH)) * shared_TH
        out_TH = out_TH + shared_TH
    return out_TH


def expected_routing(
    model_type: str, config, logits_TE: torch.Tensor, choice_bias_E: torch.Tensor | None, ids_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing rule written out from its transformers router: (the chosen ids, sorted per token; the
    weights the observed ``ids_TK`` must carry, in their order)."""
    top_k = config.num_experts_per_tok
    logits_TE = logits_TE.float()
    scores_TE = logits_TE.sigmoid() if model_type == "deepseek_v3" else logits_TE.softmax(dim=-1)
    choice_TE = scores_TE if choice_bias_E is None else scores_TE + choice_bias_E.float()
    num_groups = getattr(config, "n_group", None) or 1
    group_limited = model_type == "deepseek_v3" or getattr(config, "topk_method", None) == "group_limited_greedy"
    if group_limited and num_groups > 1:
        grouped_TGE = choice_TE.view(choice_TE.shape[0], num_groups, -1)
        if model_type == "deepseek_v3":
            group_scores_TG = grouped_TGE.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores_TG = grouped_TGE.max(dim=-1).values
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_scores_TG.topk(config.topk_group, dim=-1).indices, True)
        choice_TE = grouped_TGE.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view_as(choice_TE)
    expected_ids_TK = choice_TE.topk(top_k, dim=-1).indices.sort(dim=-1).values

    weights_TK = scores_TE.gather(1, ids_TK)
    if model_type == "mixtral" or (model_type != "deepseek_v2" and getattr(config, "norm_topk_prob", False)):
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if model_type.startswith("deepseek"):
        weights_TK = weights_TK * config.routed_scaling_factor
    return expected_ids_TK, weights_TK


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def routing_report(
    model: nn.Module,
    view: ExpertView,
    experts: dict[tuple[int, int], dict[str, torch.Tensor]],
    input_ids: torch.Tensor,
) -> dict:
    """One forward without an observer, one with a subscriber (and hooks on each MoE block), then the observer
    closed. Returns plain data and CPU tensors (the test asserts on them):

    * ``logits_plain`` / ``logits_observed``: the model's logits without and with the observer;
    * ``layers``: per observed record, in order: ``layer``, ``logits_TE``, ``expected_logits_TE``, ``output_TH``,
      ``recombined_TH``, ``ids_TK`` (sorted), ``expected_ids_TK``, ``weights_TK``, ``expected_weights_TK``,
      ``choice_bias_E``, ``unbiased_ids_TK`` (top-k of the scores alone, sorted);
    * ``records_after_remove`` / ``kept_after_remove``: records the removed subscriber / a second, kept subscriber
      got from the forward after the removal;
    * ``hooks_baseline`` / ``hooks_before_close`` / ``hooks_after_close``: the forward-hook ids of every router
      (AutoEP: and its gate) before the observer existed, before and after ``observer.close()`` (AutoEP keeps one
      hook of its own per layer: ``foreign_hooks`` names what is left); ``kept_after_close``: records the kept
      subscriber got after the close.
    """
    model.eval()
    with torch.no_grad():
        logits_plain = model(input_ids=input_ids).logits

        routers = [block.router_module for _, block in view.blocks()]
        routers += [r.gate for r in routers if isinstance(getattr(r, "gate", None), nn.Module)]
        hooks_baseline = [list(r._forward_hooks) for r in routers]  # others' hooks (AutoEP's logit recorder)

        observer = RouterObserver(model, view)
        records: list[RoutingRecord] = []
        kept: list[RoutingRecord] = []
        subscription = observer.subscribe(records.append)
        observer.subscribe(kept.append)
        inputs, outputs, handles = {}, {}, []
        for layer, block in view.blocks():

            def pre_hook(module, args, kwargs, layer=layer):
                inputs[layer] = args[0] if args else kwargs["hidden_states"]

            def hook(module, args, output, layer=layer):
                outputs[layer] = _first(output)

            handles.append(block.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(block.module.register_forward_hook(hook))
        logits_observed = model(input_ids=input_ids).logits
        for handle in handles:
            handle.remove()

        layers = []
        for record in records:
            x_TH = inputs[record.layer].reshape(-1, inputs[record.layer].shape[-1])
            bias = view.choice_bias(record.layer)
            ids_TK = record.topk_ids_TK.long()
            expected_ids, expected_weights = expected_routing(
                view.family.model_type, model.config, record.logits_TE, bias, ids_TK
            )
            unbiased = view.family.model_type == "deepseek_v3"
            scores = record.logits_TE.float().sigmoid() if unbiased else record.logits_TE.float().softmax(-1)
            layers.append(
                {
                    "layer": record.layer,
                    "logits_TE": record.logits_TE.float().cpu(),
                    "expected_logits_TE": (x_TH @ view.router_weight(record.layer).T).float().cpu(),
                    "output_TH": outputs[record.layer].reshape(x_TH.shape).cpu(),
                    "recombined_TH": recombine(view, record.layer, x_TH, ids_TK, record.topk_weights_TK, experts).cpu(),
                    "ids_TK": ids_TK.sort(dim=-1).values.cpu(),
                    "expected_ids_TK": expected_ids.cpu(),
                    "weights_TK": record.topk_weights_TK.float().cpu(),
                    "expected_weights_TK": expected_weights.cpu(),
                    "choice_bias_E": None if bias is None else bias.detach().float().cpu(),
                    "unbiased_ids_TK": scores.topk(view.top_k, dim=-1).indices.sort(dim=-1).values.cpu(),
                }
            )

        subscription.remove()
        removed_before, kept_before = len(records), len(kept)
        model(input_ids=input_ids)
        records_after_remove, kept_after_remove = len(records) - removed_before, len(kept) - kept_before
        hooks_before_close = [list(r._forward_hooks) for r in routers]
        observer.close()
        hooks_after_close = [list(r._forward_hooks) for r in routers]
        foreign_hooks = sorted(
            {getattr(h, "__qualname__", repr(h)) for r in routers for h in r._forward_hooks.values()}
        )
        kept_before = len(kept)
        model(input_ids=input_ids)
        kept_after_close = len(kept) - kept_before
    return {
        "logits_plain": logits_plain.cpu(),
        "logits_observed": logits_observed.cpu(),
        "layers": layers,
        "moe_layers": view.moe_layers,
        "records_after_remove": records_after_remove,
        "kept_after_remove": kept_after_remove,
        "hooks_baseline": hooks_baseline,
        "hooks_before_close": hooks_before_close,
        "hooks_after_close": hooks_after_close,
        "foreign_hooks": foreign_hooks,
        "kept_after_close": kept_after_close,
    }
