"""Per-domain validation loss across ranks."""

import torch
import torch.distributed as dist

from connito.data.packed import PackedSplit
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

    Each rank evaluates rows ``rank, rank + world, ...``; with ``max_batches > 0`` only ``max_batches``
    micro-batches of them, spread evenly over the split (packed rows follow documents, so the first rows would
    all come from a few documents). Sums are all-reduced, so every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    rows = list(range(rank, len(split), world_size))
    if 0 < max_batches * micro_batch < len(rows):
        picks = torch.linspace(0, len(rows) - 1, max_batches * micro_batch).round().long().tolist()
        rows = [rows[i] for i in picks]
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
