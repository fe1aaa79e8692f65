"""What routing statistics imply: pure functions of the counts :class:`~connito.analysis.RoutingStatistics` holds.

* ESFT scores (Wang et al. 2024), normalised per layer: :func:`esft_gate_scores`, :func:`esft_selection_ratios`;
  the mean of the full router distribution, :func:`mean_router_scores`;
* concentration, how many experts carry a share of a layer's gate mass: :func:`experts_to_reach`;
* domain specialisation of each expert and the domain experts it implies: :func:`domain_specialisation`,
  :func:`domain_expert_masks`;
* co-activation, P(j in top-k | i in top-k): :func:`coactivation_conditional`;
* overlap of the domains' top-N expert sets per layer (ESFT's "shared top-k" heatmap): :func:`topn_overlap`.

:func:`summarise` computes all of them from one :class:`RoutingStatistics`. A domain with fewer than ``min_tokens``
tokens gets zeros everywhere (never a division by zero, never NaN); :func:`summarise` logs a warning naming it and
its token count (:func:`usable_domains`).

Shape legend: D domains, L MoE layers (index i is ``moe_layers[i]``), E routed experts, P thresholds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from connito.analysis.statistics import RoutingStatistics
from connito.experts import ExpertMask

log = logging.getLogger("connito.analysis")

MIN_TOKENS = 100
THRESHOLDS = (0.5, 0.8, 0.9)
SHARE_TOLERANCE = 1e-9
"""A cumulative share within this of a threshold reaches it (float rounding of shares that sum to exactly it)."""


def usable_domains(
    tokens_D: torch.Tensor, min_tokens: int = MIN_TOKENS, domain_names: Sequence[str] | None = None, warn: bool = False
) -> torch.Tensor:
    """``usable_D``: the domains with at least ``max(min_tokens, 1)`` tokens; with ``warn``, a warning per other
    domain naming it and its token count."""
    usable_D = tokens_D >= max(min_tokens, 1)
    if warn:
        for d in (~usable_D).nonzero().flatten().tolist():
            name = domain_names[d] if domain_names is not None else f"domain {d}"
            log.warning(
                "domain '%s' has %d routed tokens, fewer than min_tokens=%d: its routing scores are left at zero "
                "(stream more of its rows or lower min_tokens)",
                name, int(tokens_D[d]), min_tokens,
            )  # fmt: skip
    return usable_D


def _per_domain_mean(sum_DLE: torch.Tensor, tokens_D: torch.Tensor, min_tokens: int) -> torch.Tensor:
    usable_D = usable_domains(tokens_D, min_tokens)
    mean_DLE = sum_DLE / tokens_D.clamp(min=1)[:, None, None]
    return mean_DLE * usable_D[:, None, None]


def esft_gate_scores(
    weight_sum_DLE: torch.Tensor, tokens_D: torch.Tensor, min_tokens: int = MIN_TOKENS
) -> torch.Tensor:
    """ESFT's average gate score (Wang et al. 2024, ESFT-Gate), normalised per layer.

    The paper's gate value ``g[l, e, t]`` is the weight expert e's output gets for token t: its router score when e
    is among the token's top-k, **zero otherwise**. The score is its mean over domain d's tokens,
    ``weight_sum[d, l, e] / tokens[d]`` (``weight_sum``: the top-k weights the block scaled each expert's output
    by, :class:`~connito.analysis.RoutingStatistics`), divided by its sum over the experts of the layer so that each
    layer's scores sum to 1 and ESFT's ``top_p`` is a share of the layer's gate mass (a constant scale such as
    DeepSeek-V3's ``routed_scaling_factor`` cancels). For DeepSeek-V2 (ESFT's model, no top-k renormalisation) the
    gate value is the softmax score itself; families that renormalise the top-k weights score the renormalised ones,
    the weights their blocks apply. Zero for domains with fewer than ``min_tokens`` tokens.

    Not to be confused with :func:`mean_router_scores`, the mean of the *whole* router distribution (every expert's
    softmax score, chosen or not), which Connito computed under this name before: it credits experts the router
    ranks just below the top-k, which never process the token."""
    mean_DLE = _per_domain_mean(weight_sum_DLE, tokens_D, min_tokens)
    total_DL = mean_DLE.sum(dim=-1, keepdim=True)
    return mean_DLE / torch.where(total_DL > 0, total_DL, 1.0)


def mean_router_scores(
    gate_sum_DLE: torch.Tensor, tokens_D: torch.Tensor, min_tokens: int = MIN_TOKENS
) -> torch.Tensor:
    """The mean router score ``gate_sum[d, l, e] / tokens[d]``: expert e's probability under the router's full score
    distribution (:func:`~connito.analysis.router_scores`), averaged over domain d's tokens, whether or not e was
    chosen. Sums to 1 over the experts of a layer. A measure of the router's preference, not ESFT's score (that is
    :func:`esft_gate_scores`). Zero for domains with fewer than ``min_tokens`` tokens."""
    return _per_domain_mean(gate_sum_DLE, tokens_D, min_tokens)


def esft_selection_ratios(
    selected_DLE: torch.Tensor, tokens_D: torch.Tensor, top_k: int, min_tokens: int = MIN_TOKENS
) -> torch.Tensor:
    """ESFT's token-selection ratio ``selected[d, l, e] / (tokens[d] * K)``: the share of domain d's K routing slots
    per token that went to expert e; sums to 1 over the experts of a layer. Zero for domains with fewer than
    ``min_tokens`` tokens."""
    return _per_domain_mean(selected_DLE, tokens_D, min_tokens) / top_k


def experts_to_reach(score_DLE: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS) -> torch.Tensor:
    """Concentration ``experts_needed_DLP`` (int64): for each domain, layer and threshold p, the smallest number n
    of experts whose n largest shares of the layer's mass ``score[d, l] / score[d, l].sum()`` add up to at least p
    (within :data:`SHARE_TOLERANCE`). 0 where the layer has no mass (a domain without enough tokens). Give it
    :func:`esft_gate_scores` for "how many experts carry 50 / 80 / 90 % of the gate mass"."""
    if not thresholds or any(not 0 < p <= 1 for p in thresholds):
        raise ValueError(f"thresholds {tuple(thresholds)} must be shares in (0, 1]")
    total_DL = score_DLE.sum(dim=-1)
    share_DLE = score_DLE / torch.where(total_DL > 0, total_DL, 1.0)[..., None]
    cumulative_DLE = share_DLE.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    num_experts = score_DLE.shape[-1]
    needed = [
        ((cumulative_DLE < p - SHARE_TOLERANCE).sum(dim=-1) + 1).clamp(max=num_experts) * (total_DL > 0)
        for p in thresholds
    ]
    return torch.stack(needed, dim=-1).to(torch.int64)


class Specialisation(NamedTuple):
    specialisation_LE: torch.Tensor
    """``1 - H(d | e) / log D_usable`` in [0, 1]: 1 = one domain routes to the expert, 0 = all alike (or unused)."""
    domain_share_DLE: torch.Tensor
    """p(d | e): the expert's selection rates over domains, normalised to sum 1 over domains (0 if unused)."""
    selection_rate_DLE: torch.Tensor
    """``selected[d, l, e] / tokens[d]``: the share of domain d's tokens that had expert e in their top-k."""


def domain_specialisation(
    selected_DLE: torch.Tensor, tokens_D: torch.Tensor, min_tokens: int = MIN_TOKENS
) -> Specialisation:
    """How much each expert's routing depends on the domain (Connito's definition, after Hu et al. 2026's entropy
    of per-domain routing, whose exact formula is not at hand):

    * selection rate ``r[d, l, e] = selected[d, l, e] / tokens[d]`` (a rate, so big domains do not dominate);
    * ``p(d | e) = r[d, l, e] / sum_d' r[d', l, e]``;
    * ``H(e) = -sum_d p(d | e) log p(d | e)`` in nats (0 log 0 = 0);
    * ``specialisation(e) = 1 - H(e) / log D_usable``.

    Only domains with at least ``min_tokens`` tokens take part (``D_usable`` of them); with fewer than 2 there is
    nothing to contrast and every specialisation is 0; an expert no usable domain selected has specialisation 0.
    """
    usable_D = usable_domains(tokens_D, min_tokens)
    rate_DLE = selected_DLE / tokens_D.clamp(min=1)[:, None, None] * usable_D[:, None, None]
    total_LE = rate_DLE.sum(dim=0)
    used_LE = total_LE > 0
    share_DLE = rate_DLE / torch.where(used_LE, total_LE, 1.0)
    num_usable = int(usable_D.sum())
    if num_usable < 2:
        return Specialisation(torch.zeros_like(total_LE), share_DLE, rate_DLE)
    entropy_LE = -torch.xlogy(share_DLE, share_DLE).sum(dim=0)
    specialisation_LE = ((1 - entropy_LE / math.log(num_usable)) * used_LE).clamp(0.0, 1.0)
    return Specialisation(specialisation_LE, share_DLE, rate_DLE)


def default_min_rate(top_k: int, num_experts: int) -> float:
    """Half the selection rate of an expert under perfectly even load (K / E): ``K / (2 E)``."""
    return top_k / (2 * num_experts)


def domain_expert_masks(
    selected_DLE: torch.Tensor,
    tokens_D: torch.Tensor,
    moe_layers: Sequence[int],
    num_layers: int,
    top_k: int,
    threshold: float = 0.5,
    min_rate: float | None = None,
    min_tokens: int = MIN_TOKENS,
) -> list[ExpertMask]:
    """One :class:`ExpertMask` [num_layers, E] per domain: its domain experts. Expert e of layer l is a domain
    expert of d when (see :func:`domain_specialisation`)

    * ``specialisation[l, e] >= threshold``,
    * d is its most likely domain, ``argmax_d p(d | e)`` (the lowest index on a tie), and
    * d routes to it often enough: ``selected[d, l, e] / tokens[d] >= min_rate`` (default
      :func:`default_min_rate`, half its fair share), so a rarely used expert seen by one domain only is left out.

    Every expert is a domain expert of at most one domain; domains with too few tokens have none."""
    num_experts = selected_DLE.shape[-1]
    min_rate = default_min_rate(top_k, num_experts) if min_rate is None else min_rate
    result = domain_specialisation(selected_DLE, tokens_D, min_tokens)
    usable_D = usable_domains(tokens_D, min_tokens)
    favourite_LE = result.domain_share_DLE.argmax(dim=0)
    special_LE = result.specialisation_LE >= threshold
    masks = []
    for d in range(selected_DLE.shape[0]):
        picked_LE = special_LE & (favourite_LE == d) & (result.selection_rate_DLE[d] >= min_rate) & usable_D[d]
        mask_LE = torch.zeros(num_layers, num_experts, dtype=torch.bool)
        mask_LE[list(moe_layers)] = picked_LE
        masks.append(ExpertMask(mask_LE, moe_layers))
    return masks


def coactivation_conditional(coactivation_LEE: torch.Tensor) -> torch.Tensor:
    """``P(j in top-k | i in top-k) = coactivation[l, i, j] / coactivation[l, i, i]`` as ``conditional_LEE[l, i,
    j]``; row i is 0 where expert i was never picked (the diagonal is 1 elsewhere)."""
    picked_LE = coactivation_LEE.diagonal(dim1=1, dim2=2)
    return coactivation_LEE / torch.where(picked_LE > 0, picked_LE, 1.0)[..., None]


def topn_overlap(selection_ratio_DLE: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each domain's top-N experts per layer by selection ratio, ``sets_DLE`` (bool; ties to the lower expert
    index; experts the domain never selected left out, so a domain without tokens has an empty set), and their
    Jaccard overlap ``overlap_LDD[l, a, b] = |S_a ∩ S_b| / |S_a ∪ S_b|`` (0 where both sets are empty)."""
    num_experts = selection_ratio_DLE.shape[-1]
    if not 1 <= top_n <= num_experts:
        raise ValueError(f"top_n={top_n} must be between 1 and the number of experts ({num_experts})")
    order_DLE = selection_ratio_DLE.sort(dim=-1, descending=True, stable=True).indices
    sets_DLE = torch.zeros_like(selection_ratio_DLE, dtype=torch.bool).scatter_(-1, order_DLE[..., :top_n], True)
    sets_DLE &= selection_ratio_DLE > 0
    members_DLE = sets_DLE.to(torch.float64)
    common_LDD = torch.einsum("ale,ble->lab", members_DLE, members_DLE)
    size_LD = members_DLE.sum(dim=-1).T
    union_LDD = size_LD[:, :, None] + size_LD[:, None, :] - common_LDD
    return sets_DLE, common_LDD / torch.where(union_LDD > 0, union_LDD, 1.0)


@dataclass(frozen=True)
class RoutingSummary:
    """Everything :func:`summarise` derives from one :class:`RoutingStatistics` (see each function)."""

    domain_names: tuple[str, ...]
    moe_layers: tuple[int, ...]
    tokens_D: torch.Tensor
    usable_D: torch.Tensor
    gate_score_DLE: torch.Tensor
    selection_ratio_DLE: torch.Tensor
    router_score_DLE: torch.Tensor
    thresholds: tuple[float, ...]
    experts_needed_DLP: torch.Tensor
    specialisation: Specialisation
    domain_experts: dict[str, ExpertMask]
    conditional_LEE: torch.Tensor
    top_n: int
    topn_sets_DLE: torch.Tensor
    overlap_LDD: torch.Tensor


def summarise(
    stats: RoutingStatistics,
    *,
    min_tokens: int = MIN_TOKENS,
    thresholds: Sequence[float] = THRESHOLDS,
    specialisation_threshold: float = 0.5,
    min_rate: float | None = None,
    top_n: int | None = None,
) -> RoutingSummary:
    """Every derived quantity of ``stats``; warns once per domain with fewer than ``min_tokens`` tokens.
    ``top_n`` defaults to the model's top-k."""
    tokens_D = stats.tokens_D
    usable_D = usable_domains(tokens_D, min_tokens, stats.domain_names, warn=True)
    gate_score_DLE = esft_gate_scores(stats.weight_sum_DLE, tokens_D, min_tokens)
    selection_ratio_DLE = esft_selection_ratios(stats.selected_DLE, tokens_D, stats.top_k, min_tokens)
    masks = domain_expert_masks(
        stats.selected_DLE, tokens_D, stats.moe_layers, stats.num_layers, stats.top_k,
        specialisation_threshold, min_rate, min_tokens,
    )  # fmt: skip
    top_n = stats.top_k if top_n is None else top_n
    sets_DLE, overlap_LDD = topn_overlap(selection_ratio_DLE, top_n)
    return RoutingSummary(
        domain_names=stats.domain_names,
        moe_layers=stats.moe_layers,
        tokens_D=tokens_D.clone(),
        usable_D=usable_D,
        gate_score_DLE=gate_score_DLE,
        selection_ratio_DLE=selection_ratio_DLE,
        router_score_DLE=mean_router_scores(stats.gate_sum_DLE, tokens_D, min_tokens),
        thresholds=tuple(thresholds),
        experts_needed_DLP=experts_to_reach(gate_score_DLE, thresholds),
        specialisation=domain_specialisation(stats.selected_DLE, tokens_D, min_tokens),
        domain_experts=dict(zip(stats.domain_names, masks)),
        conditional_LEE=coactivation_conditional(stats.coactivation_LEE),
        top_n=top_n,
        topn_sets_DLE=sets_DLE,
        overlap_LDD=overlap_LDD,
    )
