"""Gradient clipping by the global norm under expert parallelism at ZeRO 0.

DeepSpeed 0.19.8 clips ZeRO-0 fp32 gradients with ``deepspeed.runtime.utils.clip_grad_norm_``, which computes each
rank's norm over the parameters it holds and then *averages the norms* over the data-parallel group ("due to the
presence of moe params"). Under AutoEP each rank of an expert-parallel group holds other experts, so that mean of
per-rank norms is not the norm of the model's gradient: a run at ``parallel.ep_size=2`` clipped by another factor
than the same run at ``ep_size=1`` and drifted from it (7e-3 within 10 steps on the tiny Qwen3-MoE once clipping
engaged). ZeRO 1/2 compute the global norm correctly, so only ZeRO 0 with ``ep_size > 1`` takes this path: the
DeepSpeed config leaves ``gradient_clipping`` out (:func:`connito.training.deepspeed_config.build_deepspeed_config`)
and the trainer calls :func:`clip_grad_norm_expert_parallel_` after the gradients are reduced, before the step.

The norm: every non-expert gradient is the same on every rank after DeepSpeed's all-reduce (count it once); each
rank of an expert-parallel group holds the reduced gradients of its own experts, AutoEP's tensors or the lean
slots of its trainable experts (sum their squares over the group). ``total = sqrt(dense + experts)``; the gradients
are scaled by ``max_norm / (total + 1e-6)`` when that is below 1, DeepSpeed's own expression, so an ep-1 run and an
ep-N run clip alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from connito.parallel.expert_parallel import autoep_layers


def clip_grad_norm_expert_parallel_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip ``model``'s gradients (an AutoEP-replaced model, gradients already reduced) to ``max_norm`` by the
    global norm, and return that norm (fp32, before clipping). A collective over each expert-parallel group."""
    layers = list(autoep_layers(model).values())
    # expert parameters: AutoEP's own, and any marked as DeepSpeed marks them (``allreduce=False``), as the lean
    # slots of connito.experts.lean are (padding slots of a rank have zero gradients and add nothing)
    expert_params = {id(p) for layer in layers for p in layer.experts.parameters()}
    expert_params |= {id(p) for p in model.parameters() if getattr(p, "allreduce", True) is False}
    grads = [(id(p) in expert_params, p.grad) for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0][1].device
    dense_sq = torch.zeros((), dtype=torch.float32, device=device)
    expert_sq = torch.zeros((), dtype=torch.float32, device=device)
    for is_expert, grad in grads:
        square = grad.detach().float().pow(2).sum()
        if is_expert:
            expert_sq += square
        else:
            dense_sq += square
    groups = {id(layer.ep_group): layer.ep_group for layer in layers if layer.ep_group is not None}
    if len(groups) > 1:
        raise ValueError("every AutoEP layer must share one expert-parallel group to clip by the global norm")
    if groups and dist.is_initialized():
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=next(iter(groups.values())))
    total = (dense_sq + expert_sq).sqrt()
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for _, grad in grads:
            grad.detach().mul_(coef.to(grad.dtype))
    return total
