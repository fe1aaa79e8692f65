"""A moving per-expert threshold at each expert's capacity quantile: the causal stand-in for "take the top C".

Expert Choice gives expert e the C highest-scoring tokens of the forward, so whether token t is taken depends on
every other token of the batch, later ones included. A threshold ``tau_e`` that every expert keeps from *earlier*
batches makes the same kind of decision per token (``value[t, e] >= tau_e``), using nothing but the token's own
value. :class:`CapacityThreshold` holds ``tau`` [E] as a buffer and updates it, after a training forward has routed
with the previous value, to an exponential moving average of the batch's C-th largest value per expert::

    q_e = C-th largest of value[:, e] over the T tokens of the forward         (the (1 - C/T) quantile)
    tau_e <- q_e                              on the first update (no estimate yet)
    tau_e <- decay * tau_e + (1 - decay) * q_e   after it

so a token passes an expert's threshold about as often as Expert Choice would take it (C of T), on average over
batches. ``updates`` counts the updates (0: no estimate yet; callers then route some other causal way). Both are
buffers, so the engine's checkpoints carry them and a resumed run routes with the value it had.

Data parallel: each rank updates from its own micro-batches; :meth:`CapacityThreshold.sync_` (a collective) averages
``tau`` over the ranks so all route alike again (the routing-mode callback calls it after every optimizer step).

Shape legend: T tokens of the forward, E routed experts, C tokens per expert (the capacity).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class CapacityThreshold(nn.Module):
    """``threshold_E`` [E] and ``updates`` (a long scalar); see the module docstring."""

    def __init__(self, num_experts: int, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"a threshold decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.register_buffer("threshold_E", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @property
    def ready(self) -> bool:
        """True once the threshold has seen a batch."""
        return bool(self.updates.item() > 0)

    def passes(self, values_TE: torch.Tensor) -> torch.Tensor:
        """Boolean [T, E]: ``values_TE[t, e] >= threshold_E[e]``; each token on its own."""
        return values_TE.float() >= self.threshold_E.float()

    @torch.no_grad()
    def update(self, values_TE: torch.Tensor, capacity: int) -> None:
        """Move the threshold toward this batch's ``capacity``-th largest value per expert."""
        kth_E = values_TE.detach().float().topk(capacity, dim=0).values[-1]
        if self.ready:
            kth_E = self.decay * self.threshold_E.float() + (1.0 - self.decay) * kth_E
        self.threshold_E.copy_(kth_E.to(self.threshold_E.dtype))
        self.updates.add_(1)

    @torch.no_grad()
    def sync_(self, world_size: int, group=None) -> None:
        """Collective: every rank's threshold becomes the mean over the ``world_size`` ranks of ``group``."""
        if world_size > 1 and dist.is_initialized():
            total = self.threshold_E.float().clone()
            dist.all_reduce(total, group=group)
            self.threshold_E.copy_((total / world_size).to(self.threshold_E.dtype))
