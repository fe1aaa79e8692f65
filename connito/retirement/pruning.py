"""One-shot expert pruning by usage: keep the ``keep`` most-used routed experts of every MoE layer, remove the rest
by checkpoint surgery (:func:`connito.composition.opt_out.save_without_experts`: their FFN slices and router rows
gone, the others renumbered, plain transformers loads the result, which equals the model with those experts opted
out, logit for logit).

**Usage** is read from an ``analysis.json`` of the same checkpoint (``connito analyze``; its fingerprint is checked):
per domain, ESFT's token-selection ratio (``score=token``: the share of the layer's top-k choices that went to the
expert, Chen et al. 2022's frequency criterion) or its average gate score (``score=gate``), pooled over the
workload's domains weighted by the tokens each was measured on. Ties keep the lower expert index. An expert no
token of the workload chose scores 0 and goes first.

**Refused, before anything is written**: ``keep`` below the model's top-k (a layer must still have ``top_k``
experts to route to; lower ``num_experts_per_tok`` first), ``keep`` not below the experts per layer (nothing to
prune), an analysis of another checkpoint, a domain the analysis has no usable score for.

Not built here yet (issue 10): progressive pruning during fine-tuning (MC-SMoE's EMA schedule) and REAP's saliency
(gate weight x expert output norm), which need the trainer and expert outputs rather than an analysis.

Shape legend: L MoE layers (index i is ``moe_layers[i]``), E routed experts per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from connito.analysis.expert_scores import check_domains, load_analysis, score_source, score_table
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

log = logging.getLogger("connito.retirement")

SCORES = ("token", "gate")


class PruningError(ModelError):
    """A pruning request Connito cannot honour; the message names the fix."""


@dataclass(frozen=True)
class PrunePlan:
    moe_layers: list[int]
    usage_LE: torch.Tensor
    """Pooled usage of every expert (float64)."""
    kept: dict[int, list[int]]
    """Per MoE layer, the experts kept, in index order."""
    removed: list[tuple[int, int]]
    """Global ``(layer, expert)`` ids removed."""


def pooled_usage(analysis: dict, score: str, domains: Sequence[str] | None = None) -> torch.Tensor:
    """[L, E] usage pooled over ``domains`` (default: every usable domain), token-weighted; NaN scores count 0."""
    if score not in SCORES:
        raise PruningError(f"score={score!r}: prune by usage with 'token' (selection frequency) or 'gate'")
    source = score_source(score)
    names = check_domains(analysis, source, list(domains) if domains else source.usable(analysis))
    tokens = source.tokens(analysis)
    total = torch.zeros(
        len(analysis["model"]["moe_layers"]), int(analysis["model"]["num_experts"]), dtype=torch.float64
    )
    weight = 0.0
    for name in names:
        total += tokens[name] * torch.nan_to_num(score_table(analysis, source, name), nan=0.0)
        weight += tokens[name]
    return total / max(weight, 1.0)


def plan_pruning(analysis: dict, keep: int, score: str = "token", domains: Sequence[str] | None = None) -> PrunePlan:
    """Which experts go: per MoE layer all but the ``keep`` highest-usage ones (ties: lower index kept)."""
    model = analysis["model"]
    num_experts, top_k = int(model["num_experts"]), int(model.get("top_k", 1))
    if keep >= num_experts:
        raise PruningError(f"keep={keep}: the model has {num_experts} experts per layer; keep fewer to prune any")
    if keep < top_k:
        raise PruningError(
            f"keep={keep} is below the model's top-k ({top_k} experts per token): every layer must keep at least "
            f"top_k experts. Keep {top_k} or more, or lower num_experts_per_tok in the checkpoint's config first"
        )
    usage_LE = pooled_usage(analysis, score, domains)
    kept, removed = {}, []
    for i, layer in enumerate(model["moe_layers"]):
        order = sorted(range(num_experts), key=lambda e: (-float(usage_LE[i, e]), e))
        kept[layer] = sorted(order[:keep])
        removed += [(layer, e) for e in sorted(order[keep:])]
    return PrunePlan(list(model["moe_layers"]), usage_LE, kept, removed)


def prune_checkpoint(
    checkpoint: str | Path,
    analysis_path: str | Path,
    keep: int,
    out: str | Path,
    *,
    score: str = "token",
    domains: Sequence[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, PrunePlan]:
    """Write ``checkpoint`` pruned to ``keep`` experts per MoE layer to ``out`` (see the module docstring)."""
    from connito.composition.opt_out import save_without_experts

    checkpoint = Path(checkpoint).expanduser().resolve()
    analysis = load_analysis(analysis_path)
    fingerprint = checkpoint_fingerprint(checkpoint)
    if analysis["model"]["fingerprint"] != fingerprint:
        raise PruningError(
            f"{analysis_path} analyses another checkpoint ({analysis['model'].get('path')}, "
            f"{analysis['model']['fingerprint']}) than {checkpoint} ({fingerprint}): run `connito analyze "
            f"model_path={checkpoint}` and prune with that analysis"
        )
    plan = plan_pruning(analysis, keep, score, domains)
    written = save_without_experts(checkpoint, plan.removed, out, overwrite=overwrite)
    log.info("pruned %s to %d experts per MoE layer: %s", checkpoint, keep, written)
    return written, plan
