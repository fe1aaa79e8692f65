"""Summing the analysis' counts over the ranks of a data-parallel ``connito analyze``.

Every measurement of the analysis layer is a ratio of sums over tokens (routing counts, per-domain loss and KL
sums, token counts), so ranks that each streamed their own rows sum their sums and divide once: the result is the
one-process result over all their rows (up to the order of fp64 additions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Replace each tensor (CPU, any shape, all one dtype) by its sum over the ranks of ``group`` (default: the
    world), in one all-reduce; a no-op without a process group. A collective: every rank calls it with tensors of
    the same shapes."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1 or not tensors:
        return
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for tensor, reduced in zip(tensors, flat.cpu().split([t.numel() for t in tensors])):
        tensor.copy_(reduced.view_as(tensor))
