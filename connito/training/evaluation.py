"""Per-domain validation loss across ranks."""

import torch
import torch.distributed as dist

from connito.training.batches import PackedSplit
from connito.training.losses import domain_sums, token_cross_entropy


@torch.no_grad()
def evaluate_by_domain(
    model: torch.nn.Module,
    split: PackedSplit,
    domains: tuple[str, ...],
    micro_batch: int,
    max_batches: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean next-token loss (nats/token) per domain and over all tokens ("all").

    Each rank evaluates rows ``rank, rank + world, ...`` (the first ``max_batches`` micro-batches of them when
    ``max_batches > 0``); sums are all-reduced, so every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    rows = list(range(rank, len(split), world_size))
    if max_batches > 0:
        rows = rows[: max_batches * micro_batch]
    loss_sum_D = torch.zeros(len(domains), dtype=torch.float64)
    count_D = torch.zeros(len(domains), dtype=torch.float64)
    for start in range(0, len(rows), micro_batch):
        index = rows[start : start + micro_batch]
        input_ids = split.input_ids_NT[index].to(device)
        logits = model(input_ids=input_ids).logits
        batch_loss, batch_count = domain_sums(
            token_cross_entropy(logits, input_ids).cpu(), split.domain_ids_NT[index], len(domains)
        )
        loss_sum_D += batch_loss
        count_D += batch_count
    if dist.is_initialized() and world_size > 1:
        packed = torch.cat([loss_sum_D, count_D])
        dist.all_reduce(packed)
        loss_sum_D, count_D = packed.split(len(domains))
    model.train(was_training)
    result = {name: (loss_sum_D[i] / count_D[i]).item() for i, name in enumerate(domains) if count_D[i] > 0}
    result["all"] = (loss_sum_D.sum() / count_D.sum().clamp(min=1)).item()
    return result
