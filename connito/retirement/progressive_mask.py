"""The router edit of progressive pruning: an **additive** -inf mask on the router logits of dropped experts.

``AdditiveExpertMask(model)`` hooks every MoE router (transformers layout only) and holds a live boolean
[M, E] ``dead_ME`` that the pruning schedule changes between steps (:meth:`AdditiveExpertMask.set_dead`); a layer
with no dead expert keeps the router's own output bit for bit. In a layer with dead experts the hook adds
``0`` to every surviving logit and ``-inf`` to every dead one, then routes with the family's own rule
(:class:`connito.routing.edits.RoutingRule`):

* surviving logits are unchanged (``x + 0.0 == x``), so their order, every softmax ratio between them, and their
  rank above every dead expert are the router's own. A *multiplicative* mask (``logits * m``, as in the MC-SMoE
  reproduction) does not keep that: with ``m = 0`` for dead experts a dead logit becomes 0 and outranks every
  negative surviving logit; with ``m = -inf`` (or any large negative factor) a dead expert's negative logit flips
  sign to ``+inf`` and is chosen first. The additive mask never lets a dead expert outrank a survivor;
* softmax scores of dead experts are exactly 0 (sigmoid scores too: ``sigmoid(-inf) == 0``), and their *choice*
  score is -inf as well, so a choice bias (DeepSeek-V3's ``e_score_correction_bias``) cannot pick them;
* **fewer survivors than top-k** (e.g. one expert left, top-2 routing): the top-k still returns K ids, the extra
  ones dead experts with weight exactly 0 (their outputs are multiplied by 0 and add nothing; their gradients are
  0). The routing is then that of a model holding only the survivors with ``top_k = survivors``, which is what the
  surgery writes (:func:`connito.retirement.progressive.write_pruned`: ``num_experts_per_tok`` lowered to what is
  left). transformers' own top-k over softmax probabilities behaves the same way (dead probabilities are 0, ties
  broken arbitrarily among them), but a sigmoid router with a choice bias would pick dead experts by bias: hence the
  routing is recomputed here with dead choice scores at -inf.

Gradients: ``logits + mask`` passes the gradient through unchanged and softmax's gradient at a zero probability is
0, so dead router rows get no gradient from the routing (no NaN from the -inf). Refused: AutoEP (expert-parallel)
layers, and group-limited routing with more than one group (a masked expert changes its group's score, and a model
without it exists only when every group loses as many experts).

Shape legend: T tokens of the forward, E routed experts, K experts per token, M MoE layers (``view.moe_layers``
order).
"""

from __future__ import annotations

import torch
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock, MoEBlock
from connito.models.families import ModelError
from connito.routing.edits import SCORING, RouterEdit, RoutingRule, routing_rule


class MaskError(ModelError):
    """A model the additive expert mask cannot route exactly; the message names why and the fix."""


def additive_mask(dead_E: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[E] in ``like``'s dtype and device: 0 for surviving experts, -inf for dead ones."""
    zeros = torch.zeros(dead_E.shape, dtype=like.dtype, device=like.device)
    return zeros.masked_fill(dead_E.to(like.device), float("-inf"))


def masked_route(
    rule: RoutingRule, logits_TE: torch.Tensor, dead_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masked logits [T, E], weights [T, K] fp32, ids [T, K])``: ``rule``'s routing of ``logits_TE + mask``
    with dead experts' choice scores at -inf (see the module docstring). Groups: one group (the identity) only."""
    masked_TE = logits_TE + additive_mask(dead_E, logits_TE)
    scores_TE = SCORING[rule.scoring](masked_TE)
    choice_TE = scores_TE if rule.choice_bias_E is None else scores_TE + rule.choice_bias_E
    choice_TE = choice_TE.masked_fill(dead_E.to(choice_TE.device), float("-inf"))
    ids_TK = torch.topk(choice_TE, rule.top_k, dim=-1, sorted=rule.sorted_topk).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if rule.renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return masked_TE, weights_TK * rule.scale, ids_TK


def check_maskable(view: ExpertView) -> None:
    """Refuse (with the fix) a model whose routing the mask cannot edit exactly."""
    for layer, block in view.blocks():
        if not isinstance(block, HFMoEBlock):
            raise MaskError(
                f"layer {layer} is an expert-parallel AutoEP layer: progressive pruning masks transformers routers "
                "only; train with parallel.ep_size=1 (ZeRO 1/2 still shard the optimizer)"
            )
        rule = routing_rule(view, layer)
        if rule.groups is not None and rule.groups[0] > 1:
            raise MaskError(
                f"layer {layer} routes group-limited ({rule.groups[0]} groups): a dropped expert changes its group's "
                "score and the pruned model would need every group to lose as many experts. Prune a checkpoint with "
                "one expert group (n_group=1), or use connito prune / connito remove with equal losses per group"
            )


class AdditiveExpertMask(RouterEdit):
    """Dead experts (``dead_ME``, changed with :meth:`set_dead`) get an additive -inf on their router logits and
    can never be chosen with a non-zero weight; see the module docstring. All alive: the identity, bit for bit."""

    neutral = 0.0

    def __init__(self, model: nn.Module, *, view: ExpertView | None = None):
        view = view or ExpertView(model)
        check_maskable(view)
        self.dead_ME = torch.zeros(len(view.moe_layers), view.num_experts, dtype=torch.bool)
        super().__init__(model, {}, view=view)

    def set_dead(self, dead_ME: torch.Tensor) -> None:
        dead_ME = torch.as_tensor(dead_ME, dtype=torch.bool).cpu()
        if dead_ME.shape != self.dead_ME.shape:
            raise ValueError(f"dead mask has shape {tuple(dead_ME.shape)}, expected {tuple(self.dead_ME.shape)}")
        if dead_ME.all(dim=1).any():
            raise ValueError("every MoE layer must keep at least one expert alive")
        self.dead_ME = dead_ME.clone()

    def _hook(self, layer: int, block: MoEBlock, values_GE: torch.Tensor) -> list:
        index = self.view.moe_layers.index(layer)

        def hf_hook(module, args, output):
            dead_E = self.dead_ME[index]
            if not dead_E.any():
                return output
            logits_TE, weights_TK, ids_TK = output
            masked_TE, new_weights_TK, new_ids_TK = masked_route(routing_rule(self.view, layer), logits_TE, dead_E)
            return masked_TE, new_weights_TK.to(weights_TK.dtype), new_ids_TK.to(ids_TK.dtype)

        return [block.router_module.register_forward_hook(hf_hook, prepend=True)]
