"""Expert Choice routing (Zhou et al. 2022) for a transformers MoE block, with a causal inference route.

**Training** (``model.train()``): over the T tokens of the forward (every sequence of the micro-batch, flattened),
each expert takes its C highest-scoring tokens, ``C = round(T * capacity_factor * top_k / E)``
(:func:`~connito.routing.routed_moe.expert_capacity`; at ``capacity_factor=1`` the E x C expert-token products
equal top-k's T x K), and the block's routed output is::

    y_t = sum over experts e that took t of  scale * scores[t, e] * expert_e(x_t)

with ``scores`` the family's per-token scores (softmax over experts; the paper's G) and ``scale`` the family's
routed scaling factor (:mod:`connito.routing.routed_moe`). Every expert gets exactly C tokens (perfect balance, no
load-balancing loss needed); a token may get several experts or none. The router learns through the weights.

**The leak.** Whether expert e takes token t depends on the scores of all T tokens, later positions and other
sequences included: the training route is not causal. DeepSpeed's maintainers found Expert Choice "quite worse" than
top-k in a causal LM trial (deepspeedai/DeepSpeed#2517). So the block also trains a
:class:`~connito.routing.route_predictor.RoutePredictor` beside it (on the detached block input, binary
cross-entropy against the selection, loss term ``route_predictor``), and **in eval mode** routes by the predictor:
token t goes to the experts the predictor picks from t's own hidden state (which in a causal LM depends only on
tokens <= t), weighted as in training. The validation loss of a run is measured on that causal route.
``eval_route="expert_choice"`` (set on the block, or :meth:`connito.routing.routing_modes.RoutingModes.set_eval_route`)
evaluates with the leaky training route instead: the number to compare against, never a deployable one.

Shape legend: T tokens of the forward, E routed experts, H hidden size, C tokens per expert.
"""

from __future__ import annotations

from typing import Literal

import torch

from connito.experts.blocks import HFMoEBlock
from connito.routing.edits import RoutingRule
from connito.routing.expert_compute import experts_on_mask, experts_on_slots
from connito.routing.route_predictor import PredictorInference, RoutePredictor, predictor_loss
from connito.routing.routed_moe import RoutedMoE

EvalRoute = Literal["predictor", "expert_choice"]


def expert_choice(weights_TE: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_EC, weight_EC)``: the ``capacity`` tokens each expert takes (highest weight first) and their
    weights."""
    values_CE, token_CE = weights_TE.topk(capacity, dim=0)
    return token_CE.T, values_CE.T


class ExpertChoiceMoE(RoutedMoE):
    """Expert Choice in training, the predictor's causal route in eval (see the module docstring)."""

    mode = "expert_choice"

    def __init__(
        self,
        block: HFMoEBlock,
        rule: RoutingRule,
        capacity_factor: float,
        predictor_inference: PredictorInference = "calibrated",
        decay: float = 0.9,
    ):
        super().__init__(block, rule, capacity_factor)
        hidden_size = block.router_weight().shape[1]
        base_rate = capacity_factor * self.top_k / self.num_experts
        self.predictor = RoutePredictor(hidden_size, self.num_experts, base_rate, decay)
        self.predictor_inference = predictor_inference
        self.eval_route: EvalRoute = "predictor"
        self.per_token = min(max(round(capacity_factor * self.top_k), 1), self.num_experts)
        """The experts per token of ``predictor_inference="top_k"``."""
        self.pending_losses: list[torch.Tensor] = []
        """The predictor's loss of each training forward since the last :meth:`take_losses`."""

    def take_losses(self) -> list[torch.Tensor]:
        losses, self.pending_losses = self.pending_losses, []
        return losses

    def routed(self, hidden_TH: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        weights_TE = scores_TE * self.scale
        if self.training or self.eval_route == "expert_choice":
            return self._expert_choice(hidden_TH, weights_TE)
        logits_TE = self.predictor(hidden_TH)
        mask_TE = self.predictor.choose(logits_TE, self.predictor_inference, self.per_token)
        self._record(mask_TE, self.capacity(hidden_TH.shape[0]))
        return experts_on_mask(self.block, hidden_TH, mask_TE, weights_TE)

    def _expert_choice(self, hidden_TH: torch.Tensor, weights_TE: torch.Tensor) -> torch.Tensor:
        capacity = self.capacity(hidden_TH.shape[0])
        token_EC, weight_EC = expert_choice(weights_TE, capacity)
        out_TH = experts_on_slots(self.block, hidden_TH, token_EC, weight_EC)
        taken_TE = torch.zeros_like(weights_TE, dtype=torch.bool)
        taken_TE.scatter_(0, token_EC.T, True)
        if not self.training:
            self._record(taken_TE, capacity)
            return out_TH
        logits_TE = self.predictor(hidden_TH)
        if torch.is_grad_enabled():
            self.pending_losses.append(predictor_loss(logits_TE, taken_TE))
        with torch.no_grad():
            chosen_TE = self.predictor.choose(logits_TE, self.predictor_inference, self.per_token)
            agreement = (chosen_TE == taken_TE).float().mean()
        self.predictor.calibration.update(logits_TE, capacity)
        self._record(taken_TE, capacity, predictor_agreement=float(agreement))
        return out_TH
