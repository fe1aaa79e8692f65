"""One-shot expert pruning: keep the ``keep`` highest-scoring routed experts of every MoE layer, remove the rest
by checkpoint surgery (:func:`connito.routing.opt_out.save_without_experts`: their FFN slices and router rows
gone, the others renumbered, plain transformers loads the result, which equals the model with those experts opted
out, logit for logit).

Three scores (``score=``):

* **usage**, read from an ``analysis.json`` of the same checkpoint (``connito analyze``; its fingerprint is
  checked): per domain, ESFT's token-selection ratio (``token``: the share of the layer's top-k choices that went
  to the expert, Chen et al. 2022's frequency criterion) or its average gate score (``gate``), pooled over the
  workload's domains weighted by the tokens each was measured on;
* **REAP saliency** (``reap``, :mod:`connito.retirement.saliency`): the mean over the tokens routed to the expert
  of gate weight x expert output norm, measured by running the checkpoint over calibration batches of the
  workload's domains (no analysis needed).

Ties keep the lower expert index. An expert no token of the workload chose scores 0 and goes first.

**Refused, before anything is written**: ``keep`` below the model's top-k (a layer must still have ``top_k``
experts to route to; lower ``num_experts_per_tok`` first), ``keep`` not below the experts per layer (nothing to
prune), an analysis of another checkpoint, a domain the analysis has no usable score for, ``score=reap`` without
calibration batches.

Shape legend: L MoE layers (index i is ``moe_layers[i]``), E routed experts per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from connito.analysis.expert_scores import check_domains, load_analysis, score_source, score_table
from connito.analysis.record import AnalysisRecord, as_analysis
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

if TYPE_CHECKING:
    from connito.analysis.held_out import HeldOut

log = logging.getLogger("connito.retirement")

USAGE_SCORES = ("token", "gate")
"""Scores read from an analysis."""
SCORES = (*USAGE_SCORES, "reap")


class PruningError(ModelError):
    """A pruning request Connito cannot honour; the message names the fix."""


@dataclass(frozen=True)
class PrunePlan:
    moe_layers: list[int]
    usage_LE: torch.Tensor
    """The score every expert was ranked by (float64): pooled usage, or REAP saliency."""
    kept: dict[int, list[int]]
    """Per MoE layer, the experts kept, in index order."""
    removed: list[tuple[int, int]]
    """Global ``(layer, expert)`` ids removed."""


def pooled_usage(analysis: AnalysisRecord | dict, score: str, domains: Sequence[str] | None = None) -> torch.Tensor:
    """[L, E] usage pooled over ``domains`` (default: every usable domain), token-weighted; NaN scores count 0."""
    if score not in USAGE_SCORES:
        raise PruningError(
            f"score={score!r}: prune by usage with 'token' (selection frequency) or 'gate' (average gate score) "
            "read from an analysis, or by REAP saliency with 'reap' (measured on calibration text)"
        )
    analysis = as_analysis(analysis)
    source = score_source(score)
    names = check_domains(analysis, source, list(domains) if domains else source.usable(analysis))
    tokens = source.tokens(analysis)
    total = torch.zeros(len(analysis.model.moe_layers), analysis.model.num_experts, dtype=torch.float64)
    weight = 0.0
    for name in names:
        total += tokens[name] * torch.nan_to_num(score_table(analysis, source, name), nan=0.0)
        weight += tokens[name]
    return total / max(weight, 1.0)


def check_keep(keep: int, num_experts: int, top_k: int) -> None:
    """Refuse a ``keep`` that prunes nothing or leaves a layer fewer experts than top-k."""
    if keep >= num_experts:
        raise PruningError(f"keep={keep}: the model has {num_experts} experts per layer; keep fewer to prune any")
    if keep < top_k:
        raise PruningError(
            f"keep={keep} is below the model's top-k ({top_k} experts per token): every layer must keep at least "
            f"top_k experts. Keep {top_k} or more, or lower num_experts_per_tok in the checkpoint's config first"
        )


def plan_from_scores(score_LE: torch.Tensor, moe_layers: Sequence[int], top_k: int, keep: int) -> PrunePlan:
    """Which experts go: per MoE layer all but the ``keep`` highest-scoring ones of ``score_LE`` [L, E] (ties:
    lower index kept)."""
    num_experts = int(score_LE.shape[1])
    check_keep(keep, num_experts, top_k)
    kept, removed = {}, []
    for i, layer in enumerate(moe_layers):
        order = sorted(range(num_experts), key=lambda e: (-float(score_LE[i, e]), e))
        kept[layer] = sorted(order[:keep])
        removed += [(layer, e) for e in sorted(order[keep:])]
    return PrunePlan(list(moe_layers), score_LE.to(torch.float64), kept, removed)


def plan_pruning(
    analysis: AnalysisRecord | dict, keep: int, score: str = "token", domains: Sequence[str] | None = None
) -> PrunePlan:
    """Which experts go by usage (``score=token|gate`` of ``analysis``): per MoE layer all but the ``keep``
    most-used ones (ties: lower index kept)."""
    analysis = as_analysis(analysis)
    model = analysis.model
    if score == "reap":
        raise PruningError(
            "score='reap' is measured on calibration text, not read from an analysis: call prune_checkpoint(..., "
            "score='reap', calibration=held_out_batches(...)) or plan_from_scores(reap_saliency(...).saliency_LE, ...)"
        )
    num_experts, top_k = model.num_experts, 1 if model.top_k is None else model.top_k
    check_keep(keep, num_experts, top_k)  # before the analysis is read further
    return plan_from_scores(pooled_usage(analysis, score, domains), model.moe_layers, top_k, keep)


def load_analysis_of(
    checkpoint: Path, analysis_path: str | Path, error: type[Exception] = ModelError
) -> AnalysisRecord:
    """The ``analysis.json`` at ``analysis_path``, checked to analyse ``checkpoint`` (its fingerprint); ``error``
    (the caller's error class) names the fix otherwise."""
    analysis = load_analysis(analysis_path)
    fingerprint = checkpoint_fingerprint(checkpoint)
    if analysis.model.fingerprint != fingerprint:
        raise error(
            f"{analysis_path} analyses another checkpoint ({analysis.model.path}, "
            f"{analysis.model.fingerprint}) than {checkpoint} ({fingerprint}): run `connito analyze "
            f"model_path={checkpoint}` and use that analysis"
        )
    return analysis


def prune_checkpoint(
    checkpoint: str | Path,
    analysis_path: str | Path | None,
    keep: int,
    out: str | Path,
    *,
    score: str = "token",
    domains: Sequence[str] | None = None,
    overwrite: bool = False,
    calibration: HeldOut | None = None,
) -> tuple[Path, PrunePlan]:
    """Write ``checkpoint`` pruned to ``keep`` experts per MoE layer to ``out`` (see the module docstring).
    ``score=token|gate`` reads ``analysis_path``; ``score=reap`` measures saliency on ``calibration`` (batches of
    the workload's domains, :func:`connito.analysis.held_out.held_out_batches`) and needs no analysis."""
    from connito.routing.opt_out import save_without_experts

    checkpoint = Path(checkpoint).expanduser().resolve()
    if score == "reap":
        plan = plan_by_saliency(checkpoint, keep, calibration)
    else:
        if analysis_path is None:
            raise PruningError(f"score={score!r} reads usage from an analysis: give analysis_path=<analysis.json>")
        plan = plan_pruning(load_analysis_of(checkpoint, analysis_path, PruningError), keep, score, domains)
    written = save_without_experts(checkpoint, plan.removed, out, overwrite=overwrite)
    log.info("pruned %s to %d experts per MoE layer by %s: %s", checkpoint, keep, score, written)
    return written, plan


def plan_by_saliency(checkpoint: Path, keep: int, calibration: HeldOut | None) -> PrunePlan:
    """Keep the ``keep`` experts of highest REAP saliency on ``calibration`` in every MoE layer."""
    from connito.analysis.held_out import load_checkpoint
    from connito.experts import ExpertView
    from connito.retirement.saliency import reap_saliency

    if calibration is None:
        raise PruningError(
            "score='reap' measures saliency on calibration text: pass calibration=held_out_batches(data, checkpoint, "
            "split='train') (connito prune builds it from data= and calibration_tokens=)"
        )
    model = load_checkpoint(checkpoint)
    view = ExpertView(model)
    check_keep(keep, view.num_experts, view.top_k)  # before the calibration forwards
    saliency = reap_saliency(model, calibration.inputs, calibration.domain_ids)
    log.info("REAP saliency of %s measured on %d calibration tokens", checkpoint, saliency.tokens)
    return plan_from_scores(saliency.saliency_LE, view.moe_layers, view.top_k, keep)
