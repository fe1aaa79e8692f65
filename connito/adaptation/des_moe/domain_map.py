"""The expert-domain map: which experts serve which domain, from how often the router picks them.

Counting (every training forward): for each MoE layer and each token with a domain, every expert in the token's
top-k gets one count in that domain's row, ``counts_DLE``; ``tokens_D`` counts the domain's tokens.

Refreshing (at the end of the warm-up, then every T optimizer steps): this window's *frequency* of each expert on a
domain's tokens, ``counts / tokens`` (the share of the domain's tokens that routed to the expert), is blended into
the running estimate ``freq_DLE`` with an exponential moving average, ``ema_new`` (0.9) for the new window and
``1 - ema_new`` (0.1) for the old estimate (a domain's first window with tokens is taken as it is; a domain
without tokens in a window keeps its estimate). Frequencies rather than raw counts enter the average, so windows of
different lengths or domain mixes weigh the same. Then, per domain and MoE layer::

    serves[d, l, e]  =  freq[d, l, e] >= phi * max_e' freq[d, l, e']   and   freq[d, l, e] > 0

(phi = 0.6): an expert serves a domain when it is picked at least phi times as often as that layer's most picked
expert for the domain; an expert never picked serves nothing, so a domain not yet seen has no experts. The counts
are summed over the data-parallel ranks after every optimizer step (every rank routes its own rows), so every rank
holds the same window and the same map; after a refresh the window starts again from zero.

Shape legend: D domains, L MoE layers (index i is ``moe_layers[i]``), E routed experts, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

RELATIVE_SLACK = 1e-9
"""An expert exactly at phi of the maximum serves: the comparison forgives rounding (6/7 vs 0.6 * 10/7)."""


def serving_experts(freq_DLE: torch.Tensor, phi: float) -> torch.Tensor:
    """``serves_DLE`` (bool): ``freq >= phi * (the domain's largest frequency in the layer)`` and ``freq > 0``."""
    threshold_DL1 = phi * freq_DLE.amax(dim=-1, keepdim=True) * (1 - RELATIVE_SLACK)
    return (freq_DLE >= threshold_DL1) & (freq_DLE > 0)


class ExpertDomainMap:
    """Routing counts of the current window and the smoothed expert-domain map (None before the first refresh).

    :meth:`count` adds to this rank's counts since the last :meth:`sync`; :meth:`sync` (a collective) sums them over
    the ranks into the window ``counts_DLE`` / ``tokens_D``, which is therefore the same on every rank (the
    callback syncs after every optimizer step, so a checkpoint holds the global window); :meth:`refresh` syncs,
    then blends the window into the estimate."""

    def __init__(self, num_domains: int, moe_layers: Sequence[int], num_experts: int, phi: float, ema_new: float):
        self.num_domains, self.num_experts = num_domains, num_experts
        self.moe_layers = tuple(moe_layers)
        self.phi, self.ema_new = phi, ema_new
        self._index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.counts_DLE = torch.zeros(num_domains, len(self.moe_layers), num_experts, dtype=torch.int64)
        self.tokens_D = torch.zeros(num_domains, dtype=torch.int64)
        self._local_DLE, self._local_D = torch.zeros_like(self.counts_DLE), torch.zeros_like(self.tokens_D)
        self.freq_DLE = torch.zeros(self.counts_DLE.shape, dtype=torch.float64)
        self.estimated_D = torch.zeros(num_domains, dtype=torch.bool)
        """Domains with a frequency estimate (tokens in some window so far)."""
        self.refreshes = 0

    # -- counting --------------------------------------------------------------------------------------------------
    def count(self, layer: int, domains_T: torch.Tensor, ids_TK: torch.Tensor) -> None:
        """Add one MoE layer's routing of one forward (this rank's tokens): ``domains_T`` int [T] (-1: no domain, not
        counted), ``ids_TK`` the top-k expert ids. Tokens are counted at the first MoE layer."""
        if ids_TK.shape[0] != domains_T.shape[0]:
            raise ValueError(
                f"layer {layer} routed {ids_TK.shape[0]} tokens but the micro-batch has {domains_T.shape[0]} domain ids"
            )
        index = self._index[layer]
        if self._local_DLE.device != ids_TK.device:  # counted where the routing happens, no copy per forward
            self._local_DLE, self._local_D = self._local_DLE.to(ids_TK.device), self._local_D.to(ids_TK.device)
        domains_T = domains_T.to(ids_TK.device)
        keep_T = domains_T >= 0
        domains_N, ids_NK = domains_T[keep_T], ids_TK[keep_T]
        num_layers = len(self.moe_layers)
        flat = (domains_N[:, None] * self.num_experts * num_layers + index * self.num_experts + ids_NK).reshape(-1)
        self._local_DLE.view(-1).index_add_(0, flat, torch.ones_like(flat))
        if index == 0:
            self._local_D.index_add_(0, domains_N, torch.ones_like(domains_N))

    def sync(self) -> None:
        """Collective (a no-op in one process): add every rank's counts since the last sync to the window."""
        packed = torch.cat([self._local_DLE.reshape(-1), self._local_D])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        packed = packed.cpu()
        self.counts_DLE += packed[: -self.num_domains].view_as(self.counts_DLE)
        self.tokens_D += packed[-self.num_domains :]
        self._local_DLE.zero_()
        self._local_D.zero_()

    # -- refreshing ------------------------------------------------------------------------------------------------
    def refresh(self) -> torch.Tensor:
        """Sync, blend the window into the estimate, start a new window; returns :attr:`serves_DLE`."""
        self.sync()
        self.freq_DLE, self.estimated_D = blend(
            self.freq_DLE, self.estimated_D, self.counts_DLE, self.tokens_D, self.ema_new
        )
        self.counts_DLE.zero_()
        self.tokens_D.zero_()
        self.refreshes += 1
        return self.serves_DLE

    @property
    def serves_DLE(self) -> torch.Tensor | None:
        """[D, L, E] bool (None before the first refresh)."""
        return None if self.refreshes == 0 else serving_experts(self.freq_DLE, self.phi)

    def experts_LE(self, domains: Sequence[int]) -> torch.Tensor | None:
        """[L, E] bool: the experts some domain of ``domains`` allows (None before the first refresh)."""
        serves = self.serves_DLE
        return None if serves is None else serves[list(domains)].any(dim=0)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The synced window and the estimate (counts since the last :meth:`sync` are not part of it)."""
        state = {"counts_DLE": self.counts_DLE.clone(), "tokens_D": self.tokens_D.clone()}
        state.update(freq_DLE=self.freq_DLE.clone(), estimated_D=self.estimated_D.clone(), refreshes=self.refreshes)
        return state

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["counts_DLE"].shape) != tuple(self.counts_DLE.shape):
            raise ValueError(
                f"expert-domain map state of shape {tuple(state['counts_DLE'].shape)}, this run needs "
                f"{tuple(self.counts_DLE.shape)} (domains x MoE layers x experts)"
            )
        self.counts_DLE, self.tokens_D = state["counts_DLE"].clone(), state["tokens_D"].clone()
        self.freq_DLE, self.estimated_D = state["freq_DLE"].clone(), state["estimated_D"].clone()
        self.refreshes = int(state["refreshes"])


def blend(
    freq_DLE: torch.Tensor, estimated_D: torch.Tensor, counts_DLE: torch.Tensor, tokens_D: torch.Tensor, ema_new: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(freq_DLE, estimated_D)`` after one window (float64 frequencies, bool per domain): a domain with tokens in
    the window gets ``ema_new * counts / tokens + (1 - ema_new) * freq`` if it had an estimate, ``counts / tokens``
    (its first window, as it is) if not; a domain without tokens keeps what it had."""
    tokens_D = tokens_D.double()
    window_DLE = counts_DLE.double() / tokens_D.clamp(min=1)[:, None, None]
    seen_D = tokens_D > 0
    mixed_DLE = torch.where(estimated_D[:, None, None], ema_new * window_DLE + (1.0 - ema_new) * freq_DLE, window_DLE)
    return torch.where(seen_D[:, None, None], mixed_DLE, freq_DLE), estimated_D | seen_D
