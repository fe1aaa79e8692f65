"""Expert groups, step one: split a base MoE's routed experts into disjoint groups, one per domain, and write
each as a mask file its training job checks against the base (:mod:`connito.composition.expert_groups`).

**Partition** (:func:`partition_experts`). Each domain first picks its experts on its own with ESFT's per-layer
rule (:func:`connito.analysis.expert_scores.pick_per_layer`: the fewest positive-score experts whose share of the
layer's score reaches ``top_p``, or the ``top_n`` best), exactly what ``connito select`` would pick for it alone.
An expert picked by several domains is then *assigned* to the one for which it carries the largest share of the
layer's positive score (the quantity the rule accumulates; for analysis.json's ESFT scores, which sum to 1 per
layer, the share is the score itself), ties to the domain listed first. The others lose it and are not topped up
(topping up could take an expert another domain owns, and the groups would no longer be each domain's own
choice), so a domain that lost contested experts covers less than ``top_p`` of a layer: the function logs how many
experts were contested. ``overlap="refuse"`` raises instead, naming the first contested experts. A domain left
with no expert at all is refused (its job would train nothing). Scores are used in float64: a float32 table whose
shares should add up to exactly ``top_p`` may, rounded, fall short of it and pick one expert more.

**Group masks** (:func:`write_group_masks`) are ``connito.mask/1`` files of the base (its fingerprint, shape, MoE
layers and parameter counts), so the job's ``esft.mask_file`` / ``callbacks.trainable.mask_file`` check against
``model.path`` passes only on that base. Overlapping or empty groups are refused; an ``analysis`` of another model
than the base is refused.

Shape legend: D domains (groups), L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed
experts per MoE layer.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.analysis.expert_scores import (
    DEFAULT_TOP_P,
    SelectionError,
    analysis_file,
    check_domains,
    check_threshold,
    layer_shares,
    load_analysis,
    pick_per_layer,
    score_source,
    score_table,
)
from connito.experts import ExpertMask, ExpertView
from connito.experts.mask_file import mask_record, write_mask_file
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

log = logging.getLogger("connito.composition")

MASK_SUFFIX = ".mask.json"
PARTITION_OVERLAPS = ("assign", "refuse")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SHOWN = 4
"""Contested or shared experts named in an error."""


def partition_experts(
    scores: Mapping[str, torch.Tensor | Sequence],
    moe_layers: Sequence[int],
    num_layers: int,
    *,
    top_p: float = DEFAULT_TOP_P,
    top_n: int | None = None,
    overlap: str = "assign",
) -> dict[str, ExpertMask]:
    """Disjoint expert groups, one per domain, from per-domain expert scores ``{domain: score_LE}`` (rows follow
    ``moe_layers``, as in analysis.json; higher = the domain needs the expert more; NaN = no score) of a model
    with ``num_layers`` decoder layers. See the module docstring for the rule and ``overlap``."""
    if overlap not in PARTITION_OVERLAPS:
        raise SelectionError(f"overlap={overlap!r} must be one of {list(PARTITION_OVERLAPS)}")
    names = list(scores)
    if not names:
        raise SelectionError("partition_experts needs the scores of at least one domain")
    moe_layers = [int(layer) for layer in moe_layers]
    tables = [_score_LE(scores[d], d, len(moe_layers)) for d in names]
    widths = {d: t.shape[-1] for d, t in zip(names, tables)}
    if len(set(widths.values())) > 1 or 0 in widths.values():
        raise SelectionError(f"every domain's scores must cover the same experts, got experts per layer {widths}")
    score_DLE = torch.stack(tables)
    check_threshold(top_p, top_n, score_DLE.shape[-1])
    picked_DLE = torch.stack([pick_per_layer(score_LE, top_p, top_n) for score_LE in score_DLE])
    share_DLE = torch.stack([layer_shares(score_LE) for score_LE in score_DLE])
    contested_LE = picked_DLE.sum(dim=0) > 1
    if contested_LE.any():
        listed = ", ".join(
            f"({moe_layers[i]}, {e}): {', '.join(d for k, d in enumerate(names) if picked_DLE[k, i, e])}"
            for i, e in contested_LE.nonzero().tolist()[:SHOWN]
        )
        if overlap == "refuse":
            raise SelectionError(
                f"{int(contested_LE.sum())} experts are picked by several domains ({listed}); expert groups are "
                "disjoint: pass overlap='assign' to give each to the domain where it carries the most score, or "
                "lower top_p"
            )
        log.info(
            "%d experts picked by several domains (%s); each goes to its highest share", int(contested_LE.sum()), listed
        )
    owner_LE = torch.where(picked_DLE, share_DLE, -math.inf).argmax(dim=0)  # the first maximum: ties to domain order
    keep_DLE = picked_DLE & (owner_LE == torch.arange(len(names))[:, None, None])
    groups = {}
    for k, (name, keep_LE) in enumerate(zip(names, keep_DLE)):
        if not keep_LE.any():
            why = "each expert it picked went to another domain: a larger share, or a tie with one listed first"
            why = why if picked_DLE[k].any() else "no expert has a positive score for it"
            raise SelectionError(
                f"domain '{name}' keeps no expert ({why}): its job would train nothing. Drop the domain, or raise top_p"
            )
        mask_LE = torch.zeros(num_layers, keep_LE.shape[-1], dtype=torch.bool)
        mask_LE[moe_layers] = keep_LE
        groups[name] = ExpertMask(mask_LE, moe_layers)
    return groups


def _score_LE(scores: torch.Tensor | Sequence, domain: str, num_moe: int) -> torch.Tensor:
    try:
        score_LE = torch.as_tensor(scores, dtype=torch.float64)
    except (TypeError, ValueError):
        score_LE = None
    if score_LE is None or score_LE.dim() != 2 or score_LE.shape[0] != num_moe:
        got = "not a table of numbers" if score_LE is None else f"shape {tuple(score_LE.shape)}"
        raise SelectionError(
            f"the scores of '{domain}' must be [{num_moe} MoE layers, experts] (rows follow moe_layers), got {got}"
        )
    return score_LE


def partition_from_analysis(
    analysis_path: str | Path,
    domains: Sequence[str],
    top_p: float = DEFAULT_TOP_P,
    top_n: int | None = None,
    *,
    score: str = "gate",
    overlap: str = "assign",
) -> dict[str, ExpertMask]:
    """:func:`partition_experts` of ``domains`` on the ``score`` (``gate``: ESFT's average gate score, ``token``:
    its token-selection ratio, ``driver``: the causal driver score) that ``connito analyze`` wrote to
    ``analysis_path`` (the file or its directory)."""
    analysis = load_analysis(analysis_path)
    source = score_source(score)
    names = check_domains(analysis, source, domains)
    scores = {d: score_table(analysis, source, d) for d in names}
    moe_layers, num_layers = list(analysis.model.moe_layers), analysis.model.num_layers
    return partition_experts(scores, moe_layers, num_layers, top_p=top_p, top_n=top_n, overlap=overlap)


def write_group_masks(
    groups: Mapping[str, ExpertMask],
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    analysis: str | Path | None = None,
    selection: Mapping | None = None,
) -> dict[str, Path]:
    """Write each group as ``<out_dir>/<domain>.mask.json``, a ``connito.mask/1`` file of the checkpoint at
    ``base_dir``; returns ``{domain: path}``. ``analysis`` (the analysis.json the groups came from) is checked to be
    of the base and recorded; ``selection`` (e.g. ``{"score": "gate", "top_p": 0.2}``) is recorded as given."""
    base = Path(base_dir).expanduser().resolve()
    validate_checkpoint_dir(base)
    for name in groups:
        if not SAFE_NAME.fullmatch(name):
            raise SelectionError(f"domain '{name}' cannot name a file: use letters, digits, '_', '.', '-'")
    model, parameters = _model_section(base)
    extra = dict(selection or {})
    if analysis is not None:
        record = load_analysis(analysis)
        if record.model.fingerprint != model["fingerprint"]:
            raise ModelError(
                f"the analysis {analysis} was computed on another model (fingerprint "
                f"{record.model.fingerprint[:19]}...) than base_dir='{base}' ({model['fingerprint'][:19]}...): "
                "partition the experts from an analysis of this base (connito analyze model_path=<base>)"
            )
        extra["source"] = str(analysis_file(analysis).resolve())
    names = list(groups)
    for i, name in enumerate(names):
        if not len(groups[name]):
            raise SelectionError(f"group '{name}' has no expert: its job would train nothing")
        for other in names[:i]:
            shared = (groups[name] & groups[other]).ids()
            if shared:
                raise SelectionError(
                    f"groups '{other}' and '{name}' share experts {[tuple(e) for e in shared[:SHOWN]]}: expert groups "
                    "are disjoint (partition_experts makes them so)"
                )
    for mask in groups.values():
        mask_record(mask, model, {})  # every group fits the base before any file is written
    out = Path(out_dir).expanduser()
    paths = {}
    for name, mask in groups.items():
        section = {"method": "expert_groups", "domains": [name], "groups": names, **extra}
        paths[name] = write_mask_file(out / f"{name}{MASK_SUFFIX}", mask, model, section, parameters)
    return paths


def _model_section(base: Path):
    """The ``model`` section of a mask file of ``base`` and its parameter counts (config only, meta device)."""
    config = AutoConfig.from_pretrained(base, local_files_only=True)
    with torch.device("meta"):
        view = ExpertView(AutoModelForCausalLM.from_config(config))
    model = {
        "fingerprint": checkpoint_fingerprint(base),
        "model_type": view.family.model_type,
        "num_layers": view.num_layers,
        "moe_layers": view.moe_layers,
        "num_experts": view.num_experts,
        "path": str(base),
    }
    return model, view.count_parameters()
