"""Next-token cross-entropy, total and per domain.

Shapes: B batch, T sequence, V vocabulary, D domains. A token's loss is attributed to the domain of the
token being predicted.
"""

import torch
import torch.nn.functional as F


def token_cross_entropy(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Per-position loss ``[B, T-1]`` of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]`` (in fp32)."""
    logits = logits_BTV[:, :-1].float()
    targets = input_ids_BT[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return loss.view(targets.shape)


def domain_sums(
    loss_BT: torch.Tensor, domain_ids_BT: torch.Tensor, num_domains: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss ``[D]`` and token count ``[D]`` per domain, for the targets ``domain_ids[:, 1:]``."""
    domains = domain_ids_BT[:, 1:].reshape(-1)
    loss_sum_D = torch.zeros(num_domains, dtype=torch.float64).index_add_(0, domains, loss_BT.reshape(-1).double())
    count_D = torch.bincount(domains, minlength=num_domains).double()
    return loss_sum_D, count_D
