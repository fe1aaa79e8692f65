"""The causal inference route of Expert Choice: a small predictor of "would expert e take this token?".

Expert Choice (Zhou et al. 2022) lets each expert take its C best tokens of the batch, so in a causal LM a token's
route depends on later tokens (and on the other sequences of the batch): at generation time those do not exist.
Mixture-of-Depths (Raposo et al. 2024) met the same problem with its top-k-over-the-sequence router and trained a
small auxiliary predictor beside it; Connito does the same per MoE layer:

* :class:`RoutePredictor` is a linear map ``H -> E`` on the block's input hidden state, **detached** (the predictor
  learns from the route; it never pushes on the model), trained with binary cross-entropy against the Expert Choice
  selection of the same forward (:func:`predictor_loss`; the routing-mode callback adds it as the loss term
  ``route_predictor``). Its bias starts at ``logit(C / T)``, the base rate of being taken.
* At inference the route of token t is read from the predictor's logits of t alone. In a causal LM the block input
  at position t depends only on tokens <= t, so the route (and the output) of t does not depend on any later token.
  Two readings (``predictor_inference``):

  - ``calibrated`` (the default): expert e takes token t when its predictor logit reaches a per-expert threshold
    kept at the expert's capacity quantile of the predictor logits in training
    (:class:`~connito.routing.capacity_threshold.CapacityThreshold`), so each expert takes about C of T tokens, the
    compute it had in training;
  - ``half``: when the predicted probability exceeds 0.5 (Mixture-of-Depths' reading). A predictor that is unsure
    (probability below 1/2 for most pairs, as the base rate C/T = capacity_factor x top_k / E is) takes fewer
    tokens than training did.

  - ``top_k``: each token takes the ``k = round(capacity_factor x top_k)`` experts with the highest predictor
    logits: exactly training's average compute for every token (none gets more, none fewer), at the price of
    Expert Choice's variable experts per token.

  Before the calibration has seen a training batch, ``calibrated`` reads as ``half``.

Shape legend: T tokens of the forward, E routed experts, H hidden size, C tokens per expert.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from connito.routing.capacity_threshold import CapacityThreshold

PredictorInference = Literal["calibrated", "half", "top_k"]
PREDICTOR_INFERENCE = ("calibrated", "half", "top_k")


class RoutePredictor(nn.Module):
    """``linear`` [E, H] + bias on the detached hidden state, and ``calibration`` (per-expert logit thresholds)."""

    def __init__(self, hidden_size: int, num_experts: int, base_rate: float, decay: float):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_experts)
        rate = min(max(base_rate, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size))
            self.linear.bias.fill_(math.log(rate / (1 - rate)))
        self.calibration = CapacityThreshold(num_experts, decay)

    def forward(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """Logits [T, E] of "expert e takes token t", from each token's own (detached) hidden state."""
        return self.linear(hidden_TH.detach().to(self.linear.weight.dtype))

    def choose(self, logits_TE: torch.Tensor, inference: PredictorInference, per_token: int) -> torch.Tensor:
        """Boolean [T, E]: the inference route (see the module docstring; ``per_token``: the k of ``top_k``); per
        token, no other token involved."""
        if inference == "top_k":
            mask_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
            return mask_TE.scatter_(1, logits_TE.topk(per_token, dim=1).indices, True)
        if inference == "calibrated" and self.calibration.ready:
            return self.calibration.passes(logits_TE)
        return logits_TE > 0


def predictor_loss(logits_TE: torch.Tensor, taken_TE: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the predictor's logits against the Expert Choice selection (0/1)."""
    return F.binary_cross_entropy_with_logits(logits_TE.float(), taken_TE.float())
