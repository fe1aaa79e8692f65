"""Single-expert sufficiency (Yuan et al. 2025): how much of a domain's next-token prediction survives when every
token keeps only its top-1 expert.

For each held-out batch the model runs twice, as routed and under
:class:`~connito.routing.edits.KeepTopExperts` with ``keep=1`` (every token keeps its highest-weighted chosen
expert, weighted as the family would weight a top-1 choice; see that class). Per domain of the predicted token:

* ``loss_full_D`` and ``loss_top1_D``: mean next-token cross-entropy, nats per token;
* ``agreement_D``: the share of predicted positions whose most likely next token (argmax of the logits) is the
  same under top-1 routing as under the full top-k.

A model whose domains are served by one expert each keeps ``agreement`` near 1 and ``loss_top1`` near
``loss_full``; a model that spreads a domain over several experts per token loses more. With ``top_k = 1`` the
edit is the identity (agreement 1, the same loss).

Shape legend: B batch rows, S sequence, D domains, P predicted positions (B x (S - 1)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from connito.analysis.ranks import sum_over_ranks_
from connito.analysis.token_loss import (
    checked_inputs,
    evaluating,
    forward_logits,
    measured_batches,
    next_token_logp,
    nll,
)
from connito.experts import ExpertView
from connito.routing.edits import KeepTopExperts


@dataclass(frozen=True)
class Sufficiency:
    """What :func:`single_expert_sufficiency` measured, per domain; NaN where a domain had no tokens."""

    tokens_D: torch.Tensor
    """Predicted tokens per domain."""
    loss_full_D: torch.Tensor
    loss_top1_D: torch.Tensor
    agreement_D: torch.Tensor

    @property
    def loss_increase_D(self) -> torch.Tensor:
        """``loss_top1 - loss_full``, nats per token."""
        return self.loss_top1_D - self.loss_full_D


def single_expert_sufficiency(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    domain_ids: Iterable[torch.Tensor],
    *,
    num_domains: int | None = None,
    view: ExpertView | None = None,
    progress: bool = True,
    all_ranks: bool = False,
) -> Sufficiency:
    """Measure ``model`` on ``batches`` (input ids [B, S]) with per-token ``domain_ids`` ([B, S], domains 0..D-1,
    negative = not counted), as routed and with top-1 routing. The model runs in eval mode without gradients; its
    mode is restored after.
    ``all_ranks``: sum the measurements over the ranks of the process group before averaging, each rank having
    measured its own batches (a collective: every rank calls it, with at least one batch each)."""
    view = view or ExpertView(model)
    batches, domain_ids, num_domains = checked_inputs(
        batches, domain_ids, "single_expert_sufficiency", num_domains, all_ranks
    )
    sums = {key: torch.zeros(num_domains, dtype=torch.float64) for key in ("tokens", "full", "top1", "agree")}
    measured = measured_batches(model, batches, domain_ids, num_domains)
    with evaluating(model):
        for input_BS, targets_P, per_domain in tqdm(
            measured, total=len(batches), desc="single-expert sufficiency", unit="batch", disable=not progress
        ):
            full_PV = next_token_logp(forward_logits(model, input_BS))
            with KeepTopExperts(model, keep=1, view=view):
                top1_PV = next_token_logp(forward_logits(model, input_BS))
            sums["tokens"] += per_domain(torch.ones_like(targets_P, dtype=torch.float64))
            sums["full"] += per_domain(nll(full_PV, targets_P))
            sums["top1"] += per_domain(nll(top1_PV, targets_P))
            sums["agree"] += per_domain((full_PV.argmax(dim=-1) == top1_PV.argmax(dim=-1)).double())
    if all_ranks:
        sum_over_ranks_(list(sums.values()))
    tokens_D = sums["tokens"]
    mean = lambda sum_D: torch.where(tokens_D > 0, sum_D / tokens_D.clamp_min(1), float("nan"))  # noqa: E731
    return Sufficiency(tokens_D, mean(sums["full"]), mean(sums["top1"]), mean(sums["agree"]))
