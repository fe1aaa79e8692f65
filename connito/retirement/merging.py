"""Merge experts that do the same job into one: their weights averaged (weighted by how often each is used), their
router rows combined, the other members removed by checkpoint surgery
(:func:`connito.routing.opt_out.remove_experts`: the HF config's expert count updated, plain transformers
loads the result).

**Groups.** A group is the experts of one MoE layer merged into one; its first expert is the slot that stays
(the merged expert takes its index before renumbering). Groups are given explicitly (``[layer, expert, expert,
...]``, or ``[(layer, expert), (layer, expert), ...]``), or found per layer (:func:`similar_groups`) by average-
linkage clustering: start from one cluster per expert and join the two clusters of highest mean pairwise
similarity until ``keep`` clusters remain; each cluster of two or more experts is a group, its most-used member
first. Similarity (``similarity=``):

* ``coactivation``: how often two experts are in the same token's top-k, from the analysis
  (``coactivation[l][i][j] = P(j | i)``, symmetrised as the mean of ``P(j | i)`` and ``P(i | j)``);
* ``weight``: cosine similarity of the experts' flattened weights (``gate_up_proj`` and ``down_proj``).

**Frequency-weighted average.** With ``f_i`` the usage of member i (``frequency=token``: the analysis's
token-selection ratio pooled over the workload's domains, as pruning reads it; ``uniform``: all 1; a group none of
whose members was used counts as uniform) and ``F = sum f_i``, every tensor of the merged expert is::

    W = W_first + sum_i (f_i / F) (W_i - W_first)      (= sum_i (f_i / F) W_i)

computed in float64 and cast back, so that **identical experts merge to bit-identical weights** (every difference
is exactly 0). This is MC-SMoE's frequency-weighted merge without its neuron permutation alignment: experts
trained apart may hold the same features in different neuron orders, which plain averaging blurs.

**Router rows.** The merged slot's router row (and DeepSeek-V3's choice bias) is the same frequency-weighted
average of the group's rows. This is an approximation: the group's experts together drew ``sum_i p_i(x)`` of a
token's router probability, and no single row of a top-k router reproduces that sum for every token once the
expert count drops (``exp(r . x)`` is not ``sum_i exp(r_i . x)`` unless the rows are equal). With identical rows
(and identical experts) the merge equals removing the duplicates exactly.

**Refused, before anything is written**: a group of experts of different layers, an expert listed twice (merging
an expert with itself) or in two groups, fewer than two experts in a group, ids that do not fit the model, a layer
left with fewer than top-k experts, MoE layers losing different numbers of experts (one expert count per config),
experts of different shapes or dtypes. The input checkpoint is only read.

Shape legend: L MoE layers (index i is ``view.moe_layers[i]``), E routed experts per layer.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from connito.analysis.record import AnalysisRecord, as_analysis
from connito.experts import ExpertView
from connito.models.families import ModelError

log = logging.getLogger("connito.retirement")

SIMILARITIES = ("coactivation", "weight")
FREQUENCIES = ("token", "uniform")
PROVENANCE_FILE = "connito_merge.json"


class MergeError(ModelError):
    """A merge Connito cannot do; the message names the problem and the fix."""


@dataclass(frozen=True)
class MergeGroup:
    layer: int
    experts: tuple[int, ...]
    """The members, the slot that stays first."""
    shares: tuple[float, ...]
    """Each member's ``f_i / F`` (sum 1)."""


@dataclass(frozen=True)
class MergePlan:
    groups: list[MergeGroup]
    removed: list[tuple[int, int]]
    """Every member but the first, as global ``(layer, expert)`` ids."""
    kept: dict[int, list[int]]
    """Per MoE layer, the (old) experts left, in index order: their positions are their new ids."""


# -- groups ------------------------------------------------------------------------------------------------------


def parse_group(group: Sequence) -> tuple[int, tuple[int, ...]]:
    """``[layer, expert, expert, ...]`` or ``[(layer, expert), ...]`` as ``(layer, experts)``; refuses a group
    spanning layers, an expert listed twice, fewer than two experts."""
    items = list(group)
    if items and all(isinstance(item, Sequence) and not isinstance(item, str) for item in items):
        ids = [(int(item[0]), int(item[1])) for item in items if len(item) == 2]
        if len(ids) != len(items):
            raise MergeError(f"merge group {group}: give (layer, expert) pairs, or [layer, expert, expert, ...]")
        layers = sorted({layer for layer, _ in ids})
        if len(layers) > 1:
            raise MergeError(
                f"merge group {group} mixes experts of layers {layers}: experts of different layers read different "
                "hidden states (and may differ in shape), so they cannot be one expert. Merge experts of one layer: "
                "[layer, expert, expert, ...]"
            )
        layer, experts = layers[0], [expert for _, expert in ids]
    elif len(items) >= 1 and all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        layer, experts = items[0], items[1:]
    else:
        raise MergeError(f"merge group {group}: give [layer, expert, expert, ...] (whole numbers)")
    twice = sorted({e for e in experts if experts.count(e) > 1})
    if twice:
        raise MergeError(
            f"merge group {group} lists expert {twice[0]} of layer {layer} twice: merging an expert with itself "
            "changes nothing. List each expert once"
        )
    if len(experts) < 2:
        raise MergeError(
            f"merge group {group} has {len(experts)} expert(s) of layer {layer}: a merge needs two or more"
        )
    return layer, tuple(experts)


def check_groups(view: ExpertView, groups: Sequence[tuple[int, tuple[int, ...]]]) -> dict[int, list[int]]:
    """The experts each MoE layer keeps after ``groups`` merge; refuses what no checkpoint can hold."""
    merged_away: dict[int, list[int]] = {layer: [] for layer in view.moe_layers}
    placed: dict[tuple[int, int], tuple[int, ...]] = {}
    for layer, experts in groups:
        for expert in experts:
            view.check_id((layer, expert))
            if (layer, expert) in placed:
                raise MergeError(
                    f"expert {expert} of layer {layer} is in two merge groups ({list(placed[(layer, expert)])} and "
                    f"{list(experts)}): put it in one group (groups merge into one expert each)"
                )
            placed[(layer, expert)] = experts
        merged_away[layer] += list(experts[1:])
    kept = {layer: [e for e in range(view.num_experts) if e not in gone] for layer, gone in merged_away.items()}
    for layer, experts in kept.items():
        if len(experts) < view.top_k:
            raise MergeError(
                f"the merge would leave layer {layer} {len(experts)} experts, fewer than top-k {view.top_k} "
                f"(num_experts_per_tok): merge fewer experts, so every layer keeps at least {view.top_k}"
            )
    lost = {layer: len(gone) for layer, gone in merged_away.items()}
    if len(set(lost.values())) > 1:
        raise MergeError(
            f"the merge would take different numbers of experts from the MoE layers ({lost}); a transformers config "
            "has one expert count for every layer. Merge as many experts away in each MoE layer"
        )
    return kept


def similar_groups(similarity_LEE: torch.Tensor, keep: int, usage_LE: torch.Tensor, moe_layers: Sequence[int]):
    """Per MoE layer, ``keep`` clusters by average-linkage on ``similarity_LEE`` (ties: lowest expert ids); the
    groups ``(layer, experts)`` of the clusters with two or more experts, most-used member first."""
    groups = []
    for i, layer in enumerate(moe_layers):
        sim = similarity_LEE[i].to(torch.float64)
        clusters = [[e] for e in range(sim.shape[0])]
        while len(clusters) > keep:
            best = None
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    score = float(sim[clusters[a]][:, clusters[b]].mean())
                    if best is None or score > best[0]:
                        best = (score, a, b)
            _, a, b = best
            clusters[a] = sorted(clusters[a] + clusters.pop(b))
        for cluster in clusters:
            if len(cluster) > 1:
                groups.append((layer, tuple(sorted(cluster, key=lambda e: (-float(usage_LE[i, e]), e)))))
    return groups


def coactivation_similarity(analysis: AnalysisRecord | dict) -> torch.Tensor:
    """``[L, E, E]`` symmetrised co-activation of the analysis (never-chosen experts: 0)."""
    rows = as_analysis(analysis).coactivation
    if rows is None:
        raise MergeError(
            "analysis.json has no coactivation section: re-run `connito analyze`, or use similarity=weight"
        )
    conditional_LEE = torch.tensor([[[0.0 if v is None else float(v) for v in r] for r in m] for m in rows])
    return (conditional_LEE + conditional_LEE.transpose(1, 2)) / 2


def weight_similarity(view: ExpertView) -> torch.Tensor:
    """``[L, E, E]`` cosine similarity of the experts' flattened weights."""
    out = []
    for layer in view.moe_layers:
        flat_EP = torch.stack(
            [torch.cat([t.flatten() for _, t in sorted(view.read_expert((layer, e)).items())]).double()
             for e in range(view.num_experts)]
        )  # fmt: skip
        unit_EP = flat_EP / flat_EP.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.append(unit_EP @ unit_EP.T)
    return torch.stack(out)


def plan_merge(
    view: ExpertView,
    *,
    groups: Sequence[Sequence] | None = None,
    keep: int | None = None,
    similarity: str = "coactivation",
    usage_LE: torch.Tensor | None = None,
    analysis: AnalysisRecord | dict | None = None,
) -> MergePlan:
    """The merge of ``groups`` (explicit) or, with ``keep``, of the groups :func:`similar_groups` finds.
    ``usage_LE`` [L, E] weighs the members (None: uniform); ``analysis`` gives ``similarity=coactivation``."""
    L, E = len(view.moe_layers), view.num_experts
    usage = torch.ones(L, E, dtype=torch.float64) if usage_LE is None else usage_LE.to(torch.float64)
    if tuple(usage.shape) != (L, E):
        raise MergeError(f"usage is {tuple(usage.shape)}, the model has [{L} MoE layers, {E} experts]")
    if (groups is None) == (keep is None):
        raise MergeError("give either groups=[[layer, expert, expert, ...], ...] or keep=<experts per layer>, not both")
    if groups is not None:
        parsed = [parse_group(group) for group in groups]
    else:
        if not view.top_k <= keep < E:
            raise MergeError(
                f"keep={keep}: merge down to between top-k ({view.top_k}) and {E - 1} experts per layer (the model "
                f"has {E})"
            )
        if similarity not in SIMILARITIES:
            raise MergeError(f"similarity={similarity!r}: choose one of {list(SIMILARITIES)}")
        if similarity == "coactivation":
            if analysis is None:
                raise MergeError("similarity=coactivation reads the analysis: give its analysis.json, or use weight")
            similarity_LEE = coactivation_similarity(analysis)
        else:
            similarity_LEE = weight_similarity(view)
        parsed = similar_groups(similarity_LEE, keep, usage, view.moe_layers)
    kept = check_groups(view, parsed)
    index = {layer: i for i, layer in enumerate(view.moe_layers)}
    planned = []
    for layer, experts in parsed:
        f = torch.stack([usage[index[layer], e] for e in experts]).clamp_min(0)
        f = f if float(f.sum()) > 0 else torch.ones_like(f)
        planned.append(MergeGroup(layer, experts, tuple(float(x) for x in f / f.sum())))
    removed = sorted((g.layer, e) for g in planned for e in g.experts[1:])
    return MergePlan(planned, removed, kept)


# -- the merge ---------------------------------------------------------------------------------------------------


def weighted_average(tensors: Sequence[torch.Tensor], shares: Sequence[float], what: str) -> torch.Tensor:
    """``tensors[0] + sum_i shares[i] (tensors[i] - tensors[0])`` in float64, cast back to the first's dtype."""
    first = tensors[0]
    for tensor in tensors[1:]:
        if tensor.shape != first.shape or tensor.dtype != first.dtype:
            raise MergeError(
                f"{what}: cannot average a {tensor.dtype} {tuple(tensor.shape)} tensor with a {first.dtype} "
                f"{tuple(first.shape)} one; merge experts of the same shape and dtype"
            )
    base = first.double()
    total = base.clone()
    for tensor, share in zip(tensors[1:], shares[1:]):
        total += share * (tensor.double() - base)
    return total.to(first.dtype)


def merge_in_place(model: PreTrainedModel, plan: MergePlan) -> None:
    """Write each group's merged expert, router row (and choice bias) into its first member's slot of ``model``;
    the other members stay (remove them with :func:`remove_experts`)."""
    view = ExpertView(model)
    for group in plan.groups:
        layer, first = group.layer, group.experts[0]
        where = f"merge group {[layer, *group.experts]}"
        members: list[Mapping[str, torch.Tensor]] = [view.read_expert((layer, e)) for e in group.experts]
        names = sorted(members[0])
        view.write_expert(
            (layer, first),
            {name: weighted_average([m[name] for m in members], group.shares, f"{where} '{name}'") for name in names},
        )
        router_EH = view.read_router(layer)
        row_H = weighted_average([router_EH[e] for e in group.experts], group.shares, f"{where} router row")
        view.write_router_rows(layer, [first], row_H[None])
        bias_E = view.choice_bias(layer)
        if bias_E is not None:
            bias_E = bias_E.detach().clone()
            bias_E[first] = weighted_average([bias_E[e] for e in group.experts], group.shares, f"{where} choice bias")
            view.write_choice_bias(layer, bias_E)


def merge_experts(model: PreTrainedModel, plan: MergePlan) -> PreTrainedModel:
    """A new model of ``model``'s class with every group of ``plan`` merged into its first slot and the other
    members removed (renumbered as :func:`remove_experts` does); ``model`` is not changed."""
    from connito.routing.opt_out import remove_experts

    work = copy.deepcopy(model)
    merge_in_place(work, plan)
    return remove_experts(work, plan.removed)


def merge_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    groups: Sequence[Sequence] | None = None,
    keep: int | None = None,
    similarity: str = "coactivation",
    frequency: str = "token",
    analysis_path: str | Path | None = None,
    domains: Sequence[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, MergePlan]:
    """Write ``checkpoint`` with experts merged (see the module docstring) to ``out`` (``save_pretrained``,
    safetensors, the checkpoint's dtype, tokenizer files copied, ``connito_merge.json`` naming the groups and which
    old expert each new one is). ``frequency=token`` and ``similarity=coactivation`` read ``analysis_path`` (an
    analysis of this very checkpoint). Every refusal comes before anything is written; the checkpoint is only
    read."""
    from transformers import AutoModelForCausalLM

    from connito.experts.delta.staging import check_out_dir, copy_tokenizer_files, staged_dir
    from connito.models.loading import validate_checkpoint_dir
    from connito.retirement.pruning import load_analysis_of, pooled_usage
    from connito.routing.opt_out import remove_experts

    source = Path(checkpoint).expanduser().resolve()
    target = check_out_dir(out, overwrite, {"the checkpoint": source})
    validate_checkpoint_dir(source)
    if frequency not in FREQUENCIES:
        raise MergeError(
            f"frequency={frequency!r}: weigh the members by 'token' (usage from the analysis) or 'uniform'"
        )
    needs_analysis = frequency == "token" or (groups is None and similarity == "coactivation")
    analysis = None
    if needs_analysis:
        if analysis_path is None:
            raise MergeError(
                "frequency=token and similarity=coactivation read an analysis of the checkpoint: give analysis_path= "
                "(`connito analyze model_path=<checkpoint>`), or merge with frequency=uniform similarity=weight"
            )
        analysis = load_analysis_of(source, analysis_path, MergeError)
    usage_LE = pooled_usage(analysis, "token", domains) if frequency == "token" else None
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype="auto").eval()
    view = ExpertView(model)
    plan = plan_merge(view, groups=groups, keep=keep, similarity=similarity, usage_LE=usage_LE, analysis=analysis)
    merge_in_place(model, plan)
    merged = remove_experts(model, plan.removed)
    with staged_dir(target) as stage:
        merged.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(source, stage)
        provenance = {
            "source": str(source),
            "groups": [{"layer": g.layer, "experts": list(g.experts), "shares": list(g.shares)} for g in plan.groups],
            "kept": {str(layer): experts for layer, experts in plan.kept.items()},
        }
        (stage / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("%s with %d merge groups written to %s", source, len(plan.groups), target)
    return target, plan
