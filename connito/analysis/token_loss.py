"""Next-token loss per domain on held-out batches: what the driver scan, single-expert sufficiency and the
reweighting effect all measure.

A token's loss counts for the domain of the token being predicted (``domain_ids[:, 1:]``, as in
:mod:`connito.training.losses`); positions whose target domain is negative (padding) count for none.

Shape legend: B batch rows, S sequence, V vocabulary, D domains, P predicted positions (B x (S - 1)).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class DomainSum:
    """Sum per-position values [P] into [D] (fp64, on the CPU) by the positions' target domains; negative domains
    count for none."""

    def __init__(self, domains_P: torch.Tensor, num_domains: int):
        self.counted_P = domains_P >= 0
        self.domains_P = domains_P.clamp_min(0)
        self.num_domains = num_domains

    def __call__(self, values_P: torch.Tensor) -> torch.Tensor:
        summed_D = torch.zeros(self.num_domains, dtype=torch.float64, device=values_P.device)
        counted_P = torch.where(self.counted_P, values_P.double(), 0.0)
        return summed_D.index_add_(0, self.domains_P, counted_P).cpu()


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits [B, S, V] (no KV cache)."""
    return model(input_ids=input_ids, use_cache=False).logits


def next_token_logp(logits_BSV: torch.Tensor) -> torch.Tensor:
    """log p of the next token [P, V] (fp32), from the logits of every position but the last."""
    return torch.log_softmax(logits_BSV[:, :-1].float(), dim=-1).reshape(-1, logits_BSV.shape[-1])


def nll(logp_PV: torch.Tensor, targets_P: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [P] of each target."""
    return -logp_PV.gather(1, targets_P.unsqueeze(1)).squeeze(1)


def check_batches(batches: list[torch.Tensor], domain_ids: list[torch.Tensor], who: str) -> None:
    """Refuse batches ``who`` (the measuring function, named in the message) cannot measure."""
    if not batches:
        raise ValueError(f"{who} needs at least one batch")
    if len(batches) != len(domain_ids):
        raise ValueError(f"{len(batches)} batches but {len(domain_ids)} domain id tensors: give one per batch")
    for index, (input_BS, domain_BS) in enumerate(zip(batches, domain_ids)):
        if input_BS.dim() != 2 or input_BS.shape[1] < 2:
            raise ValueError(f"batch {index}: input_ids must be [B, S] with S >= 2, got {tuple(input_BS.shape)}")
        if tuple(domain_BS.shape) != tuple(input_BS.shape):
            raise ValueError(
                f"batch {index}: domain ids have shape {tuple(domain_BS.shape)}, the input ids "
                f"{tuple(input_BS.shape)}: give one domain id per token"
            )
        if input_BS.is_floating_point() or domain_BS.is_floating_point():
            raise ValueError(f"batch {index}: input ids and domain ids must be integer tensors")


def checked_inputs(
    batches, domain_ids, who: str, num_domains: int | None, all_ranks: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """``(batches, domain_ids, num_domains)`` as lists, checked for ``who``; ``num_domains`` defaults to the
    largest domain id + 1 (it must be given under ``all_ranks``: the ranks' batches may not all hold every domain)."""
    batches, domain_ids = list(batches), list(domain_ids)
    check_batches(batches, domain_ids, who)
    if num_domains is None:
        if all_ranks:
            raise ValueError("all_ranks=True needs num_domains: the ranks' batches may not all hold every domain")
        num_domains = max(int(d.max()) for d in domain_ids) + 1
    if num_domains < 1:
        raise ValueError("no token has a domain id >= 0: nothing to measure")
    return batches, domain_ids, num_domains


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def measured_batches(
    model: nn.Module, batches: list[torch.Tensor], domain_ids: list[torch.Tensor], num_domains: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, DomainSum]]:
    """Per batch: ``(input_BS on the model's device, targets_P, per_domain)``: the next-token targets and a
    :class:`DomainSum` of their target domains."""
    device = next(model.parameters()).device
    for input_BS, domain_BS in zip(batches, domain_ids):
        input_BS = input_BS.to(device)
        yield input_BS, input_BS[:, 1:].reshape(-1), DomainSum(domain_BS[:, 1:].reshape(-1).to(device), num_domains)


def domain_losses(
    model: nn.Module,
    batches: list[torch.Tensor],
    domain_ids: list[torch.Tensor],
    num_domains: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens_D, loss_D)``: predicted tokens and mean next-token loss (nats; NaN where a domain has no token)
    of ``model`` on ``batches`` per target domain. Eval mode, no gradients; the mode is restored after."""
    batches, domain_ids, num_domains = checked_inputs(batches, domain_ids, "domain_losses", num_domains)
    tokens_D = torch.zeros(num_domains, dtype=torch.float64)
    loss_D = torch.zeros(num_domains, dtype=torch.float64)
    with evaluating(model):
        for input_BS, targets_P, per_domain in measured_batches(model, batches, domain_ids, num_domains):
            tokens_D += per_domain(torch.ones_like(targets_P, dtype=torch.float64))
            loss_D += per_domain(nll(next_token_logp(forward_logits(model, input_BS)), targets_P))
    return tokens_D, torch.where(tokens_D > 0, loss_D / tokens_D.clamp_min(1), float("nan"))
