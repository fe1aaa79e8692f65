"""What boosting a domain's experts does to every domain's loss, and the folded export of a boost.

``connito analyze reweighting.enabled=true`` picks, for each domain, the experts to boost
(:func:`boost_targets`: its strongest driver experts, its domain experts, or both), applies each domain's
:class:`~connito.analysis.reweighting.Reweighting` as a router edit on held-out text and measures the loss of
*every* domain under it (:func:`reweighting_effect`): the diagonal is the gain on the boosted domain, the rest what
the boost costs the others. ``reweighting.export=true`` also writes each domain's boost folded into the weights as
a plain transformers checkpoint (:func:`export_reweighted`), or refuses before any work where the family's routing
does not allow an exact fold (:func:`~connito.analysis.reweighting.fold_refusal`).

Shape legend: D domains (the measured ones), R reweightings (one per boosted domain), L decoder layers, E experts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from connito.analysis.drivers import DriverScores
from connito.analysis.ranks import sum_over_ranks_
from connito.analysis.reweighting import Reweighting, fold_into_weights
from connito.analysis.summaries import RoutingSummary
from connito.analysis.token_loss import (
    checked_inputs,
    evaluating,
    forward_logits,
    measured_batches,
    next_token_logp,
    nll,
)
from connito.common.atomic import atomic_replace_dir
from connito.experts import ExpertId, ExpertView
from connito.experts.delta.staging import copy_tokenizer_files

TARGETS = ("drivers", "domain_experts")


def boost_targets(
    domain: int,
    targets: Sequence[str],
    summary: RoutingSummary,
    drivers: DriverScores | None,
    drivers_per_domain: int,
) -> list[ExpertId]:
    """The experts to boost for ``domain``: with ``"drivers"`` its ``drivers_per_domain`` highest-scoring driver
    experts whose score is positive (boosting them lowered the domain's loss in the scan), across all layers; with
    ``"domain_experts"`` the experts whose specialisation made them this domain's experts. Sorted, no repeats."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"reweighting.targets must be a non-empty list of {', '.join(TARGETS)}; got {list(targets)}")
    chosen: set[ExpertId] = set()
    if "drivers" in targets:
        if drivers is None:
            raise ValueError(
                "reweighting.targets includes 'drivers' but the driver scan is off: set drivers.enabled=true, or "
                "reweighting.targets=[domain_experts]"
            )
        ranked = [(i, s) for i, s in drivers.ranking(domain) if s > 0]
        chosen.update(i for i, _ in ranked[:drivers_per_domain])
    if "domain_experts" in targets:
        name = summary.domain_names[domain]
        chosen.update(ExpertId(*i) for i in summary.domain_experts[name].ids())
    return sorted(chosen)


@dataclass(frozen=True)
class ReweightingEffect:
    """Per-domain loss as routed and under each reweighting (NaN where a domain had no tokens)."""

    reweightings: tuple[Reweighting, ...]
    """One per boosted domain (row r of ``loss_RD``)."""
    tokens_D: torch.Tensor
    loss_D: torch.Tensor
    """As routed, nats per token."""
    loss_RD: torch.Tensor
    """Under reweighting r, measured on domain d."""

    @property
    def change_RD(self) -> torch.Tensor:
        """``loss_RD - loss_D``: negative = the boost lowered that domain's loss."""
        return self.loss_RD - self.loss_D


def reweighting_effect(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    domain_ids: Iterable[torch.Tensor],
    reweightings: Sequence[Reweighting],
    *,
    num_domains: int | None = None,
    view: ExpertView | None = None,
    progress: bool = True,
    all_ranks: bool = False,
) -> ReweightingEffect:
    """Every domain's loss on ``batches`` as routed and under each of ``reweightings`` (a reweighting that boosts
    nothing is not run: its row is the routed loss). Eval mode, no gradients; the mode is restored after.
    ``all_ranks``: sum the measurements over the ranks of the process group before averaging, each rank having
    measured its own batches (a collective: every rank calls it, with at least one batch each)."""
    view = view or ExpertView(model)
    batches, domain_ids, num_domains = checked_inputs(batches, domain_ids, "reweighting_effect", num_domains, all_ranks)
    tokens_D = torch.zeros(num_domains, dtype=torch.float64)
    base_D = torch.zeros(num_domains, dtype=torch.float64)
    sums_RD = torch.zeros(len(reweightings), num_domains, dtype=torch.float64)
    active = [r for r, rw in enumerate(reweightings) if any(f != 1 for f in rw.boost.values())]
    bar = tqdm(total=len(batches) * (1 + len(active)), desc="reweighting", unit="forward", disable=not progress)
    with evaluating(model):
        for input_BS, targets_P, per_domain in measured_batches(model, batches, domain_ids, num_domains):
            tokens_D += per_domain(torch.ones_like(targets_P, dtype=torch.float64))
            loss_D = per_domain(nll(next_token_logp(forward_logits(model, input_BS)), targets_P))
            base_D += loss_D
            bar.update(1)
            for r, reweighting in enumerate(reweightings):
                if r not in active:
                    sums_RD[r] += loss_D
                    continue
                with reweighting.apply(model, view):
                    logp_PV = next_token_logp(forward_logits(model, input_BS))
                sums_RD[r] += per_domain(nll(logp_PV, targets_P))
                bar.update(1)
    bar.close()
    if all_ranks:
        sum_over_ranks_([tokens_D, base_D, sums_RD])
    count_D = tokens_D.clamp_min(1)
    nan_D = torch.where(tokens_D > 0, 0.0, float("nan")).double()
    return ReweightingEffect(tuple(reweightings), tokens_D, base_D / count_D + nan_D, sums_RD / count_D + nan_D)


def export_reweighted(model: nn.Module, model_path: Path, reweighting: Reweighting, out_dir: Path) -> Path:
    """Write ``model`` with ``reweighting`` folded into its weights (:func:`fold_into_weights`, exact or refused)
    as a ``save_pretrained`` checkpoint in ``out_dir``, with the tokenizer files of ``model_path``; ``model``
    itself is left unchanged (the fold works on a copy, so this holds a second copy of the weights in memory).
    Written to a temporary directory first, so a failure leaves no half checkpoint."""
    folded = fold_into_weights(copy.deepcopy(model), reweighting)
    out_dir = Path(out_dir)
    with atomic_replace_dir(out_dir) as stage:
        folded.save_pretrained(stage)
        copy_tokenizer_files(Path(model_path), stage)
    return out_dir
