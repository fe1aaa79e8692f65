"""The optimizer's parameter groups as checkpoint code sees them: their parameter names, and their settings
around a load that copies another layout's settings in by position."""

from __future__ import annotations

from pathlib import Path

import torch

from connito.common.atomic import atomic_open
from connito.training.collective import barrier
from connito.training.deepspeed_internals import UNIVERSAL_OPTIMIZER_FILE, inner_optimizer


def optimizer_param_names(engine) -> list[list[str]] | None:
    """The names of the optimizer's parameters, group by group; None when its groups hold no module parameters
    (ZeRO 1/2 and bf16 optimizers keep flat partitions)."""
    optimizer = inner_optimizer(engine)
    if optimizer is None or not hasattr(optimizer, "param_groups"):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if any(n is None for g in groups for n in g):
        return None
    return groups


def snapshot_groups(engine) -> list[dict]:
    """The current run's optimizer group settings (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in inner_optimizer(engine).param_groups]


def pad_param_groups(universal: Path, count: int, is_main: bool) -> None:
    """Collective: give the universal folder's ``optimizer_state.pt`` at least ``count`` param groups.

    DeepSpeed restores the optimizer group by group, zipping the current groups with the checkpoint's
    (``base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir``): a run with more groups than the checkpoint
    (ep 1 -> ep 2 adds the expert group) would silently skip the extra ones. Their settings are padding only;
    :func:`restore_groups` puts the current run's settings back after the load.
    """
    path = universal / UNIVERSAL_OPTIMIZER_FILE
    if is_main:
        state = torch.load(path, map_location="cpu", weights_only=False)
        groups = state["param_groups"]
        if len(groups) < count:
            groups.extend(dict(groups[-1]) for _ in range(count - len(groups)))
            with atomic_open(path, "wb") as handle:
                torch.save(state, handle)
    barrier()


def restore_groups(engine, snapshot: list[dict]) -> None:
    """Undo DeepSpeed's positional copy of the checkpoint's group settings; learning rates from the scheduler."""
    groups = inner_optimizer(engine).param_groups
    for group, saved in zip(groups, snapshot, strict=True):
        for key in [k for k in group if k != "params" and k not in saved]:
            del group[key]
        group.update(saved)
    scheduler = engine.lr_scheduler
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or lambdas is None:
        return
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
