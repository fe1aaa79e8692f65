"""Router distillation: the frozen pretrained router teaches the adaptive router, with a weight that decays.

The term (per micro-batch, averaged over the MoE layers and the tokens of the forward)::

    L_KD = mean_layers mean_tokens KL( softmax(R_pre(h) / t) || softmax(R_adapt(h) / t) ),     t = tau (0.7)

``R_adapt(h)`` is the adaptive router's logits (:mod:`connito.adaptation.des_moe.router`), ``R_pre(h) = h @
W_pre.T`` the pretrained router, a frozen copy of the router weights taken before training, applied to the *same*
hidden states ``h`` the adaptive router saw in this forward. The teacher is a target: its logits are computed
without gradient (from ``h.detach()``), so the KL pulls the adaptive router (and, through ``h``, the layers below
it) towards what the pretrained router says about the current hidden states, never the teacher towards the student.
As in the paper's equation the KL is not multiplied by ``t**2``. Softmax is taken over the logits for every family
(for DeepSeek-V3's sigmoid scores it is a distance between logit vectors, which is what the paper's formula states).

The trainer's loss becomes ``lambda * L_KD + (1 - lambda) * L_task``: the DES-MoE callback sets this term's
``coef`` to lambda and the trainer's ``task_loss_weight`` to ``1 - lambda`` before each micro-batch
(:meth:`connito.training.callbacks.Callback.on_micro_batch`). lambda follows a schedule of progress = step /
train.steps, ``max(0, 1 - progress)`` by default; any other is a config value (``cosine``, ``piecewise`` with knots) or
a function registered with :func:`register_kd_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from connito.adaptation.des_moe.router import AdaptiveRouters
from connito.training.callbacks import CallbackError, LossTerm, MicroBatch

Schedule = Callable[[float], float]

_SCHEDULES: dict[str, Schedule] = {
    "linear": lambda progress: max(0.0, 1.0 - progress),
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))),
}


def register_kd_schedule(name: str, schedule: Schedule, *, replace: bool = False) -> None:
    """Make ``callbacks.des_moe.kd_schedule=<name>`` use ``schedule(progress) -> lambda`` (lambda in [0, 1])."""
    if name == "piecewise" or (name in _SCHEDULES and not replace):
        raise ValueError(f"a KD schedule named '{name}' already exists; pass replace=True to override it")
    _SCHEDULES[name] = schedule


def piecewise(knots: Sequence[Sequence[float]]) -> Schedule:
    """Linear between ``[[progress, lambda], ...]`` (increasing progress), flat outside them."""
    points = [(float(p), float(v)) for p, v in knots]
    if not points or any(b[0] <= a[0] for a, b in zip(points, points[1:])):
        raise CallbackError(
            f"callbacks.des_moe.kd_knots={[list(p) for p in points]}: give [[progress, lambda], ...] with increasing "
            "progress, e.g. [[0, 1], [0.5, 0]]"
        )

    def schedule(progress: float) -> float:
        if progress <= points[0][0]:
            return points[0][1]
        for (p0, v0), (p1, v1) in zip(points, points[1:]):
            if progress <= p1:
                return v0 + (v1 - v0) * (progress - p0) / (p1 - p0)
        return points[-1][1]

    return schedule


def kd_schedule(name: str, knots: Sequence[Sequence[float]] = ()) -> Schedule:
    """The schedule a config names; refuses an unknown name or a piecewise schedule without knots."""
    if name == "piecewise":
        inner = piecewise(knots)
    elif name in _SCHEDULES:
        if knots:
            raise CallbackError(f"callbacks.des_moe.kd_knots is set but kd_schedule={name}; use kd_schedule=piecewise")
        inner = _SCHEDULES[name]
    else:
        known = ", ".join(sorted([*_SCHEDULES, "piecewise"]))
        raise CallbackError(
            f"callbacks.des_moe.kd_schedule='{name}' is not one of {known} (register more with "
            "connito.adaptation.des_moe.distill.register_kd_schedule)"
        )

    def checked(progress: float) -> float:
        value = float(inner(progress))
        if not 0.0 <= value <= 1.0:
            raise CallbackError(
                f"KD schedule '{name}' gave lambda={value} at progress {progress}; it must be in [0, 1]"
            )
        return value

    return checked


def router_kl(teacher_TE: torch.Tensor, student_TE: torch.Tensor, tau: float) -> torch.Tensor:
    """``mean_T KL(softmax(teacher / tau) || softmax(student / tau))`` in fp32."""
    log_p_TE = F.log_softmax(teacher_TE.float() / tau, dim=-1)
    log_q_TE = F.log_softmax(student_TE.float() / tau, dim=-1)
    return (log_p_TE.exp() * (log_p_TE - log_q_TE)).sum(dim=-1).mean()


class RouterDistillation(LossTerm):
    """``L_KD`` over the captures of the adaptive routers (see the module docstring); ``coef`` is lambda, set by
    the DES-MoE callback before each micro-batch."""

    name = "des_moe_kd"

    def __init__(self, routers: AdaptiveRouters, tau: float):
        self.routers, self.tau, self.coef = routers, tau, 1.0
        self._teachers: dict[int, torch.Tensor] = {}

    def teacher_logits(self, layer: int, hidden_TH: torch.Tensor) -> torch.Tensor:
        weight_EH = self._teachers.get(layer)
        if weight_EH is None or weight_EH.device != hidden_TH.device:
            weight_EH = self.routers.teacher_weights[layer].to(hidden_TH.device)
            self._teachers[layer] = weight_EH
        with torch.no_grad():
            return F.linear(hidden_TH.detach().float(), weight_EH.float())

    def __call__(self, batch: MicroBatch, outputs) -> torch.Tensor | None:
        captures = self.routers.take_captures()
        if not captures:
            return None
        per_layer = [router_kl(self.teacher_logits(c.layer, c.hidden_TH), c.logits_TE, self.tau) for c in captures]
        return torch.stack(per_layer).mean()
