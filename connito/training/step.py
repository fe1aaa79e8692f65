"""One optimizer step on the DeepSpeed engine: forward, loss (next-token loss plus the run's loss terms),
backward, step, over the gradient-accumulation micro-batches. The loop around it lives in
:mod:`connito.training.trainer`.

Shapes: B micro-batch, T sequence length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from connito.data.packed import PackedSplit
from connito.experts.lean import sync as sync_lean_experts
from connito.training.batches import StepSampler
from connito.training.callbacks import LossTerm, MicroBatch, check_loss_value
from connito.training.deepspeed_internals import skipped_update
from connito.training.losses import token_cross_entropy

NONFINITE_MODES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """A NaN or inf training loss under ``train.nonfinite_loss=stop`` (raised on every rank, same message)."""


def _domain_mix(batch: MicroBatch, domain_names: Sequence[str] | None) -> str:
    ids, counts = torch.unique(batch.domain_ids_BT.reshape(-1), return_counts=True)
    names = [domain_names[i] if domain_names and 0 <= i < len(domain_names) else str(i) for i in ids.tolist()]
    return ", ".join(f"{name} {count} tokens" for name, count in zip(names, counts.tolist(), strict=True))


def agree_on_nonfinite(bad_M: torch.Tensor) -> torch.Tensor:
    """Collective: ``[world, M]`` float64, row r holding rank r's non-finite micro-batch losses (0 elsewhere), so
    every rank sees which rank and micro-batch went non-finite (and takes the same decision)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bad_M[None]
    flags_RM = torch.zeros(dist.get_world_size(), bad_M.numel(), dtype=torch.float64)
    flags_RM[dist.get_rank()] = bad_M
    dist.all_reduce(flags_RM)
    return flags_RM


def describe_nonfinite(flags_RM: torch.Tensor, step: int) -> str:
    where = [
        f"rank {rank} micro-batch {micro} (loss {flags_RM[rank, micro].item()})"
        for rank, micro in (~torch.isfinite(flags_RM)).nonzero().tolist()
    ]
    return f"non-finite training loss at step {step + 1}: " + "; ".join(where)


def micro_batch(split: PackedSplit, sampler: StepSampler, step: int, micro_step: int, device) -> MicroBatch:
    rows = sampler.rows(step, micro_step)
    return MicroBatch(split.input_ids_NT[rows].to(device), split.domain_ids_NT[rows], step, micro_step)


def forward_loss(
    engine, batch: MicroBatch, loss_terms: Sequence[LossTerm], task_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, lm_loss, {term name: value})`` of one micro-batch: ``task_weight * lm_loss + sum(coef * value)``
    (a weight of 1 leaves ``lm_loss`` bit for bit)."""
    outputs = engine(input_ids=batch.input_ids_BT)
    lm_loss = token_cross_entropy(outputs.logits, batch.input_ids_BT).mean()
    loss, values = (lm_loss if task_weight == 1.0 else task_weight * lm_loss), {}
    for term in loss_terms:
        value = term(batch, outputs)
        if value is None:
            continue
        values[term.name] = check_loss_value(term, value)
        loss = loss + term.coef * value
    return loss, lm_loss, values


def train_step(
    engine,
    split: PackedSplit,
    sampler: StepSampler,
    step: int,
    loss_terms: Sequence[LossTerm],
    device: torch.device,
    before_forward: Callable[[MicroBatch], float] | None = None,
    clip: Callable[[], torch.Tensor] | None = None,
    nonfinite: str = "stop",
    domain_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Run optimizer step ``step`` (0-based): every micro-batch goes through ``engine.backward`` and
    ``engine.step``; DeepSpeed applies the update at the accumulation boundary. Returns the step's mean losses on
    this rank: ``loss`` (next-token, unweighted) and each loss term that gave a value, by name.

    ``before_forward(batch)``, when given, runs before each micro-batch's forward and returns the weight of the
    next-token loss in that micro-batch's loss (the trainer's: callbacks' ``on_micro_batch``, then
    ``trainer.task_loss_weight``).

    ``clip()``, when given, runs after the last micro-batch's backward (gradients reduced) and before the step that
    applies the update: it clips the gradients and returns their global norm, returned as ``grad_norm`` (Connito's
    own clipping where DeepSpeed's is wrong: :mod:`connito.parallel.grad_clip`).

    A NaN or inf loss (the micro-batch's whole loss) on any rank: ``nonfinite="stop"`` raises
    :class:`NonFiniteLossError` on every rank before the update, naming the step, rank(s) and micro-batch(es) (and
    the domain mix of this rank's); ``"skip"`` applies no update on any rank and returns ``skipped: 1.0``."""
    sums: dict[str, float] = {"loss": 0.0}
    grad_norm, skip = None, False
    bad_M = torch.zeros(sampler.grad_accum, dtype=torch.float64)
    mixes: dict[int, str] = {}
    for micro_step in range(sampler.grad_accum):
        batch = micro_batch(split, sampler, step, micro_step, device)
        task_weight = 1.0 if before_forward is None else before_forward(batch)
        loss, lm_loss, values = forward_loss(engine, batch, loss_terms, task_weight)
        engine.backward(loss)
        value = loss.detach().float().item()
        if value != value or value in (float("inf"), float("-inf")):
            bad_M[micro_step] = value
            mixes[micro_step] = _domain_mix(batch, domain_names)
        last = micro_step == sampler.grad_accum - 1
        if last:  # every rank decides the same, before the update
            flags_RM = agree_on_nonfinite(bad_M)
            if not torch.isfinite(flags_RM).all():
                message = describe_nonfinite(flags_RM, step)
                if nonfinite != "skip":
                    rank = dist.get_rank() if dist.is_initialized() else 0
                    here = "".join(
                        f"; on this rank (rank {rank}) micro-batch {m} domains: {d}" for m, d in mixes.items()
                    )
                    raise NonFiniteLossError(
                        f"{message}{here}. train.nonfinite_loss=stop stopped the run before the update; "
                        "train.nonfinite_loss=skip skips such steps instead"
                    )
                skip = True
        if clip is not None and last and not skip:
            grad_norm = float(clip())
        if skip:
            with skipped_update(engine):
                engine.step()
        else:
            engine.step()
        sums["loss"] += lm_loss.item()
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value.item()
    # Lean experts (connito.experts.lean): the update went into the compact slots; write them into the fused
    # tensors now, so whatever reads the parameters after the step (checkpoints, callbacks, evaluation) sees it.
    sync_lean_experts(engine.module)
    means = {name: total / sampler.grad_accum for name, total in sums.items()}
    if grad_norm is not None:
        means["grad_norm"] = grad_norm
    if skip:
        means["skipped"] = 1.0
    return means
