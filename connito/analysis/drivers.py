"""Driver experts by causal effect: perturb one expert's routing weight up and down and measure what changes.

Hu et al. 2026 (arXiv 2601.10159) find *driver experts* causally: scale one expert's routing probability by a
factor above 1 and below 1, and measure the change in next-token loss and the KL divergence of the next-token
distributions, per domain, on held-out text. :func:`driver_scan` does this for every (layer, expert) asked::

    scores = driver_scan(model, batches, domain_ids)       # batches: input_ids [B, S]; domain_ids: [B, S] each
    scores.ranking(domain=0)                               # [(ExpertId, score), ...], the strongest drivers first

The perturbation is :class:`connito.routing.edits.ExpertWeightScale`: the expert's weight is scaled (and the
family's top-k renormalisation re-applied) only on the tokens that already chose it, so the effect is measured
where the router uses the expert; an expert no token chooses scores 0 (exactly, or to the rounding of CPU matmuls
over B rows for the reference and 2nB rows for the perturbed copies, ~1e-7 nats).

For domain d, layer l, expert e, with ``loss_*`` the mean next-token cross-entropy (nats per predicted token of d)
and ``KL_*`` the mean ``KL(p_reference || p_perturbed)`` of the next-token distributions (nats per token of d):

* ``delta_loss_up = loss_up - loss_reference``, ``delta_loss_down = loss_down - loss_reference``;
* ``score = (loss_down - loss_up) / 2`` (signed, nats): positive when boosting the expert lowers d's loss and
  suppressing it raises it (a driver d relies on); negative when boosting it hurts d;
* ``importance = (KL_up + KL_down) / 2`` (>= 0, nats): how much the perturbation moves d's predictions at all,
  whichever way the loss goes.

A token's loss and KL count for the domain of the token being predicted (``domain_ids[:, 1:]``, as in
:mod:`connito.training.losses`); positions whose target domain is negative (padding) count for none.

**Batched.** One forward scores ``experts_per_forward`` experts: the batch is replicated ``2 n`` times along the
batch dimension and copy ``2 i`` carries expert i's up-perturbation, copy ``2 i + 1`` its down-perturbation (the
edit's row blocks). The unperturbed reference forward runs once per batch. Copies do not interact (attention and
MoE routing are per row), so the batched scan gives what one forward per perturbation gives, to fp rounding.

Shape legend: B batch rows, S sequence, V vocabulary, D domains, L decoder layers, E routed experts per layer,
P predicted positions (B x (S - 1)).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
from connito.experts import ExpertId, ExpertView
from connito.routing.edits import ExpertWeightScale

DEFAULT_EXPERTS_PER_FORWARD = 4
"""Experts per forward (2 copies of the batch each). Measured 2026-11-23 on 2 shared CPU threads, the
quickstart-sized Qwen3-MoE (hidden 128, 4 layers x 8 experts, top-2, vocab 4096, random weights), a full scan of
the 32 experts on one batch of 8 x 256 tokens: 1 -> 5.1-6.1 s, 2 -> 4.7-5.1 s, 4 -> 4.2-5.3 s, 8 -> 5.6-7.0 s;
peak RSS 0.67 / 1.19 / 1.76 GB at 1 / 4 / 8 (the 2n copies of the [B, S, V] logits dominate)."""


@dataclass(frozen=True)
class DriverScores:
    """What :func:`driver_scan` measured, per (domain, layer, expert) in the global numbering; NaN where an expert
    was not scanned (dense layers, experts not asked for) or a domain had no tokens."""

    factor_up: float
    factor_down: float
    scanned_LE: torch.Tensor
    """bool [L, E]: the experts scanned."""
    tokens_D: torch.Tensor
    """Predicted tokens per domain."""
    loss_D: torch.Tensor
    """Reference (unperturbed) mean loss per domain, nats."""
    delta_loss_up_DLE: torch.Tensor
    delta_loss_down_DLE: torch.Tensor
    kl_up_DLE: torch.Tensor
    kl_down_DLE: torch.Tensor

    @property
    def num_domains(self) -> int:
        return self.tokens_D.shape[0]

    @property
    def score_DLE(self) -> torch.Tensor:
        """``(loss_down - loss_up) / 2`` in nats: positive = boosting the expert lowers the domain's loss."""
        return (self.delta_loss_down_DLE - self.delta_loss_up_DLE) / 2

    @property
    def importance_DLE(self) -> torch.Tensor:
        """``(KL_up + KL_down) / 2`` in nats: how far the perturbations move the domain's predictions."""
        return (self.kl_up_DLE + self.kl_down_DLE) / 2

    def ranking(self, domain: int, by: str = "score") -> list[tuple[ExpertId, float]]:
        """The scanned experts of ``domain``, best first, by ``score`` (signed, largest first), ``abs_score``
        (largest |score| first) or ``importance``."""
        values = {"score": self.score_DLE, "abs_score": self.score_DLE.abs(), "importance": self.importance_DLE}
        if by not in values:
            raise ValueError(f"rank by one of {sorted(values)}, got '{by}'")
        if not 0 <= domain < self.num_domains:
            raise ValueError(f"domain {domain} is out of range: the scan saw domains 0..{self.num_domains - 1}")
        by_LE = values[by][domain]
        ids = [ExpertId(int(layer), int(expert)) for layer, expert in self.scanned_LE.nonzero().tolist()]
        return sorted(((i, float(by_LE[i])) for i in ids), key=lambda item: -item[1])


def check_factors(factor_up: float, factor_down: float) -> None:
    if not factor_up > 1 or factor_up == float("inf"):
        raise ValueError(f"factor_up must be a finite number > 1 (it boosts the expert's weight), got {factor_up}")
    if not 0 <= factor_down < 1:
        raise ValueError(f"factor_down must be in [0, 1) (it suppresses the expert's weight), got {factor_down}")


def driver_scan(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    domain_ids: Iterable[torch.Tensor],
    experts: Iterable[Sequence[int]] | None = None,
    factor_up: float = 2.0,
    factor_down: float = 0.5,
    experts_per_forward: int = DEFAULT_EXPERTS_PER_FORWARD,
    progress: bool = True,
    *,
    num_domains: int | None = None,
    view: ExpertView | None = None,
    all_ranks: bool = False,
) -> DriverScores:
    """Scan ``experts`` (default: every routed expert of every MoE layer; an :class:`~connito.experts.ExpertMask`
    or (layer, expert) pairs) on ``batches`` (input_ids [B, S]) with per-token ``domain_ids`` ([B, S], domains
    0..D-1, negative = not counted). ``num_domains`` defaults to the largest domain id + 1 (give it under
    ``all_ranks``). The model runs in eval mode without gradients; its mode is restored after.
    ``all_ranks``: sum the measurements over the ranks of the process group before averaging, each rank having
    measured its own batches (a collective: every rank calls it, with at least one batch each)."""
    check_factors(factor_up, factor_down)
    if not isinstance(experts_per_forward, int) or experts_per_forward < 1:
        raise ValueError(f"experts_per_forward must be an integer >= 1, got {experts_per_forward!r}")
    view = view or ExpertView(model)
    batches, domain_ids, num_domains = checked_inputs(batches, domain_ids, "driver_scan", num_domains, all_ranks)
    ids = _expert_list(view, experts)
    moe_index = {layer: i for i, layer in enumerate(view.moe_layers)}
    chunks = [ids[i : i + experts_per_forward] for i in range(0, len(ids), experts_per_forward)]

    shape = (num_domains, view.num_layers, view.num_experts)
    sums = {key: torch.zeros(shape, dtype=torch.float64) for key in ("loss_up", "loss_down", "kl_up", "kl_down")}
    ref_loss_D = torch.zeros(num_domains, dtype=torch.float64)
    tokens_D = torch.zeros(num_domains, dtype=torch.float64)
    bar = tqdm(total=len(batches) * len(chunks), desc="driver scan", unit="forward", disable=not progress)
    with evaluating(model):
        for input_BS, targets_P, per_domain in measured_batches(model, batches, domain_ids, num_domains):
            ref_logp_PV = next_token_logp(forward_logits(model, input_BS))
            ref_p_PV = ref_logp_PV.exp()
            ref_loss_D += per_domain(nll(ref_logp_PV, targets_P))
            tokens_D += per_domain(torch.ones_like(targets_P, dtype=torch.float64))
            for chunk in chunks:
                factors_GME = torch.ones(2 * len(chunk), len(view.moe_layers), view.num_experts)
                for i, (layer, expert) in enumerate(chunk):
                    factors_GME[2 * i, moe_index[layer], expert] = factor_up
                    factors_GME[2 * i + 1, moe_index[layer], expert] = factor_down
                with ExpertWeightScale(model, factors_GME, view=view):
                    logits_CBSV = forward_logits(model, input_BS.repeat(2 * len(chunk), 1))
                logits_CBSV = logits_CBSV.view(2 * len(chunk), *input_BS.shape, -1)
                for i, (layer, expert) in enumerate(chunk):
                    for direction, copy in (("up", 2 * i), ("down", 2 * i + 1)):
                        logp_PV = next_token_logp(logits_CBSV[copy])
                        kl_P = (ref_p_PV * (ref_logp_PV - logp_PV)).sum(dim=-1)
                        sums[f"loss_{direction}"][:, layer, expert] += per_domain(nll(logp_PV, targets_P))
                        sums[f"kl_{direction}"][:, layer, expert] += per_domain(kl_P)
                bar.update(1)
    bar.close()

    if all_ranks:
        sum_over_ranks_([*sums.values(), ref_loss_D, tokens_D])
    scanned_LE = torch.zeros(view.num_layers, view.num_experts, dtype=torch.bool)
    for layer, expert in ids:
        scanned_LE[layer, expert] = True
    count_D11 = tokens_D.view(-1, 1, 1)
    ref_D11 = ref_loss_D.view(-1, 1, 1)

    def mean(sum_DLE: torch.Tensor) -> torch.Tensor:
        return torch.where(scanned_LE, sum_DLE / count_D11, float("nan"))

    return DriverScores(
        factor_up=float(factor_up),
        factor_down=float(factor_down),
        scanned_LE=scanned_LE,
        tokens_D=tokens_D,
        loss_D=ref_loss_D / tokens_D,
        delta_loss_up_DLE=mean(sums["loss_up"] - ref_D11),
        delta_loss_down_DLE=mean(sums["loss_down"] - ref_D11),
        kl_up_DLE=mean(sums["kl_up"]),
        kl_down_DLE=mean(sums["kl_down"]),
    )


def _expert_list(view: ExpertView, experts: Iterable[Sequence[int]] | None) -> list[ExpertId]:
    if experts is None:
        return [ExpertId(layer, expert) for layer in view.moe_layers for expert in range(view.num_experts)]
    ids = sorted({view.check_id(expert_id) for expert_id in experts})
    if not ids:
        raise ValueError("no experts to scan: pass None for all of them")
    return ids
