"""The DeepSpeed engine around a model: AdamW with warm-up + cosine, the DeepSpeed config, and AutoEP's expert
groups when expert parallelism is on."""

from __future__ import annotations

import torch

from connito.training.config import ConnitoConfig
from connito.training.deepspeed_config import build_deepspeed_config
from connito.training.distributed import DistInfo
from connito.training.schedule import warmup_cosine


def build_optimizer(model: torch.nn.Module, cfg: ConnitoConfig, split_moe: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases, routing biases). Parameters that do not require grad get
    no optimizer state (and a group left without parameters is not made).

    ``split_moe``: put expert parameters (AutoEP's, after the replacement) in their own ``moe`` groups, which
    DeepSpeed's ZeRO-1/2 and bf16 optimizers need to reduce them over the expert-data-parallel group."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if split_moe:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # No empty groups: DeepSpeed drops them from the optimizer after the scheduler was built on it (a run that
    # trains only expert matrices has no vector to put in no_decay).
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def build_engine(model, cfg: ConnitoConfig, info: DistInfo, model_type: str, load_universal: bool):
    """``(engine, scheduler)``: the DeepSpeed engine around ``model`` with AdamW and the warm-up + cosine schedule."""
    import deepspeed

    if cfg.parallel.ep_size > 1 and (cfg.engine.zero_stage > 0 or cfg.engine.precision == "bf16"):
        # DeepSpeed builds the optimizer after AutoEP replaced the MoE blocks, so the expert groups hold the
        # live expert-parallel parameters.
        def optimizer(_params):
            return build_optimizer(model, cfg, split_moe=True)

        def scheduler(opt):
            return warmup_cosine(opt, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    else:
        optimizer = build_optimizer(model, cfg)
        scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    ds_config = build_deepspeed_config(
        cfg.engine, cfg.optim, cfg.train, info.world_size, cfg.parallel, model_type, load_universal=load_universal
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler
