"""Expert-threshold routing: each expert takes the tokens whose score reaches its moving capacity threshold.

The causal relative of Expert Choice (after arXiv 2603.11535): instead of "expert e takes its C best tokens of
this batch", expert e takes token t when ``scores[t, e] >= tau_e``, where ``tau_e`` is a per-expert threshold kept at
the expert's capacity quantile (C of T tokens, ``C = round(T * capacity_factor * top_k / E)``) of the scores of
*earlier* training batches (:class:`~connito.routing.capacity_threshold.CapacityThreshold`: an exponential moving
average of each batch's C-th largest score, ``decay`` 0.9 by default, updated after the batch was routed with the
previous value). A token's route therefore depends on its own score and on the past only: the route is causal in
training as well as at inference, and training and inference route the same way (no predictor needed).

* Output: ``y_t = sum over e with scores[t, e] >= tau_e of scale * scores[t, e] * expert_e(x_t)`` (scores and
  scale as in :mod:`connito.routing.routed_moe`).
* Balance and compute are right on average, not per batch: an expert takes C tokens of a batch in expectation; a
  token may take any number of experts (0 to E). The run logs the worst expert's load over its capacity
  (``routing/max_load``), the mean experts per token and the share of tokens no expert took.
* Before the first update there is no threshold: the first training forward (and any forward of an untrained
  block) routes the family's way, each token to its top-k experts by score, and sets ``tau`` from that batch.
* ``tau`` is a buffer of the block (``<block>.connito_routing.threshold.threshold_E``): checkpoints carry it, data
  parallel ranks average it after every optimizer step, the HF export ships it beside the weights.

Shape legend: T tokens of the forward, E routed experts, H hidden size, K experts per token.
"""

from __future__ import annotations

import torch

from connito.experts.blocks import HFMoEBlock
from connito.routing.capacity_threshold import CapacityThreshold
from connito.routing.edits import RoutingRule
from connito.routing.expert_compute import experts_on_mask
from connito.routing.routed_moe import RoutedMoE


class ExpertThresholdMoE(RoutedMoE):
    """Threshold routing (see the module docstring)."""

    mode = "expert_threshold"

    def __init__(self, block: HFMoEBlock, rule: RoutingRule, capacity_factor: float, decay: float = 0.9):
        super().__init__(block, rule, capacity_factor)
        self.threshold = CapacityThreshold(self.num_experts, decay)

    def route(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Boolean [T, E]: the experts each token takes, from its own scores and the current thresholds."""
        if self.threshold.ready:
            return self.threshold.passes(scores_TE)
        mask_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
        return mask_TE.scatter_(1, scores_TE.topk(self.top_k, dim=1).indices, True)

    def routed(self, hidden_TH: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        mask_TE = self.route(scores_TE)
        out_TH = experts_on_mask(self.block, hidden_TH, mask_TE, scores_TE * self.scale)
        capacity = self.capacity(hidden_TH.shape[0])
        self._record(mask_TE, capacity)
        if self.training:
            self.threshold.update(scores_TE, capacity)  # after routing: this batch never routes by its own threshold
        return out_TH
