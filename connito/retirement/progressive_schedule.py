"""The schedule of progressive pruning (:mod:`connito.retirement.progressive`), pure: the cap of each window, the
usage normalised over the survivors, the experts a window drops, and :class:`PruneSchedule`, the state a run keeps
(EMA usage, alive mask, windows done, history) and its checkpoints carry. The rules are in that module's docstring.

Shape legend: M MoE layers (``view.moe_layers`` order), E routed experts per layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from connito.training.callbacks import CallbackError

OPTION = "callbacks.progressive_prune"


def schedule_cap(window: int, num_windows: int, num_experts: int, target: int) -> int:
    """The most experts a layer may keep after window ``window`` (1-based) of ``num_windows``: linear from
    ``num_experts`` (window 0) to ``target`` (window ``num_windows`` and after)."""
    if window >= num_windows:
        return target
    return num_experts - math.floor((num_experts - target) * window / num_windows)


def normalised_usage(ema_ME: torch.Tensor, alive_ME: torch.Tensor) -> torch.Tensor:
    """[M, E] float64: the EMA normalised over each layer's survivors (0 for dead experts; uniform over the
    survivors where their EMA sums to 0)."""
    usage_ME = torch.where(alive_ME, ema_ME.double(), 0.0)
    total_M1 = usage_ME.sum(dim=1, keepdim=True)
    uniform_ME = alive_ME.double() / alive_ME.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(total_M1 > 0, usage_ME / total_M1.clamp_min(torch.finfo(torch.float64).tiny), uniform_ME)


def plan_drops(usage_ME: torch.Tensor, alive_ME: torch.Tensor, *, beta: float, cap: int, target: int) -> torch.Tensor:
    """[M, E] bool: the survivors dropped at the end of a window (see the module docstring, steps 2 and 3).
    ``usage_ME`` is :func:`normalised_usage`; ``cap`` is :func:`schedule_cap` of the window."""
    dropped_ME = torch.zeros_like(alive_ME, dtype=torch.bool)
    for m in range(alive_ME.shape[0]):
        alive = alive_ME[m].nonzero().flatten().tolist()
        n = len(alive)
        if n <= target:
            continue
        usage = {e: float(usage_ME[m, e]) for e in alive}
        below = sum(1 for e in alive if usage[e] < beta / n)
        drop = min(max(below, n - cap, 0), n - target)
        order = sorted(alive, key=lambda e: (usage[e], -e))  # lowest usage first; ties: higher index first
        dropped_ME[m, order[:drop]] = True
    return dropped_ME


@dataclass
class PruneSchedule:
    """The state of a progressive pruning run: EMA usage, alive mask, windows done, what each window did.

    :meth:`observe` takes one optimizer step's selection counts [M, E]; :meth:`end_window` drops experts."""

    moe_layers: list[int]
    num_experts: int
    target: int
    num_windows: int
    beta: float = 0.1
    ema: float = 0.9
    ema_ME: torch.Tensor = field(default=None)  # type: ignore[assignment]
    alive_ME: torch.Tensor = field(default=None)  # type: ignore[assignment]
    steps_observed: int = 0
    windows_done: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = (len(self.moe_layers), self.num_experts)
        if self.ema_ME is None:
            self.ema_ME = torch.zeros(shape, dtype=torch.float64)
        if self.alive_ME is None:
            self.alive_ME = torch.ones(shape, dtype=torch.bool)

    @property
    def finished(self) -> bool:
        return self.windows_done >= self.num_windows

    def observe(self, counts_ME: torch.Tensor) -> None:
        """One step's token-selection counts; dead experts' counts are ignored. A layer that routed no token to a
        survivor keeps its EMA."""
        counts_ME = torch.where(self.alive_ME, counts_ME.detach().to("cpu", torch.float64), 0.0)
        total_M1 = counts_ME.sum(dim=1, keepdim=True)
        share_ME = counts_ME / total_M1.clamp_min(1.0)
        seen_M1 = total_M1 > 0
        if self.steps_observed == 0:
            new_ME = share_ME
        else:
            new_ME = self.ema * self.ema_ME + (1.0 - self.ema) * share_ME
        self.ema_ME = torch.where(seen_M1 & self.alive_ME, new_ME, self.ema_ME)
        self.steps_observed += 1

    def end_window(self, step: int) -> torch.Tensor:
        """Drop experts at the end of the next window (``step``: the global step it ends at); returns the dropped
        [M, E] mask and records the window in :attr:`history`."""
        if self.finished:
            raise ValueError(f"the schedule has done its {self.num_windows} windows")
        window = self.windows_done + 1
        cap = schedule_cap(window, self.num_windows, self.num_experts, self.target)
        usage_ME = normalised_usage(self.ema_ME, self.alive_ME)
        n_M = self.alive_ME.sum(dim=1)
        dropped_ME = plan_drops(usage_ME, self.alive_ME, beta=self.beta, cap=cap, target=self.target)
        self.alive_ME = self.alive_ME & ~dropped_ME
        self.ema_ME = torch.where(self.alive_ME, self.ema_ME, 0.0)
        self.windows_done = window
        self.history.append(
            {
                "window": window,
                "step": int(step),
                "cap": cap,
                "threshold": {str(layer): self.beta / int(n_M[m]) for m, layer in enumerate(self.moe_layers)},
                "usage": {str(layer): usage_ME[m].tolist() for m, layer in enumerate(self.moe_layers)},
                "dropped": {
                    str(layer): dropped_ME[m].nonzero().flatten().tolist() for m, layer in enumerate(self.moe_layers)
                },
                "alive_mask": self.alive_ME.int().tolist(),
            }
        )
        return dropped_ME

    def kept(self) -> dict[int, list[int]]:
        """The surviving experts of every MoE layer, in index order."""
        return {layer: self.alive_ME[m].nonzero().flatten().tolist() for m, layer in enumerate(self.moe_layers)}

    def state_dict(self) -> dict:
        return {
            "ema": self.ema_ME.clone(),
            "alive": self.alive_ME.clone(),
            "steps_observed": self.steps_observed,
            "windows_done": self.windows_done,
            "history": json.loads(json.dumps(self.history)),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if tuple(state["alive"].shape) != tuple(self.alive_ME.shape):
            raise CallbackError(
                f"{OPTION}: the checkpoint's schedule is for {tuple(state['alive'].shape)} (MoE layers x experts), "
                f"this model has {tuple(self.alive_ME.shape)}: resume the run with the model it started with"
            )
        self.ema_ME = state["ema"].to(torch.float64).clone()
        self.alive_ME = state["alive"].to(torch.bool).clone()
        self.steps_observed = int(state["steps_observed"])
        self.windows_done = int(state["windows_done"])
        self.history = list(state["history"])
