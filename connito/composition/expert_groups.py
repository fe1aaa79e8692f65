"""Expert-group jobs: split a base MoE's routed experts into disjoint groups, one per domain, train each group as an
independent job that touches only its experts, then merge the jobs' expert delta packages back onto the base.

The workflow (only the first and last steps are here; training is ``connito adapt``)::

    groups = partition_from_analysis("runs/analysis", ["code", "math"], top_p=0.2)  # {domain: ExpertMask}
    masks = write_group_masks(groups, "ckpt/base", "groups/")                       # {domain: groups/<d>.mask.json}
    # per domain, anywhere, in any order:
    #   connito adapt method=esft esft.mask_file=groups/code.mask.json model.path=ckpt/base data.domains=[code]
    merge_groups("ckpt/base", {"code": "runs/code/delta", "math": "runs/math/delta"}, "ckpt/merged",
                 validate=held_out_validator("ckpt/base", data_cfg, ["code", "math"]))

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

**Merge** (:func:`merge_groups`). Refused before anything is written, in this order: an output directory that
could touch an input (or a non-empty one without ``overwrite``); a package that is not one (manifest); a *foreign
group*, a package whose base fingerprint is not the base's (both fingerprints named); packages of different dtypes;
a damaged package (:func:`~connito.experts.delta.load_delta` checks every file's sha256 *before* parsing it and
every tensor's name, shape and dtype against the manifest, in memory: nothing reaches a model before that); a
tensor that does not fit the base (:func:`~connito.experts.delta.apply.checked_tensors`). What a package
*changes* is what it carries minus what is bit-identical to the base (an expert or module tensor carried unchanged
neither counts as overlap nor is written; it is recorded as ``carried_unchanged``). Packages overlap when two
change the same routed expert or the same non-expert tensor (a router trained by two jobs, say). ``overlap=``:

* ``refuse`` (default): raise, naming each pair of packages and their first shared experts and modules;
* ``average``: each overlapping tensor is the elementwise mean of the packages' tensors, summed in float32 in
  package order, divided by their count, cast to the base's dtype (BTX's
  :func:`~connito.composition.btx_merge.branch_mean`); the base's own tensor does not take part;
* ``first``: the first package (mapping order) that changes it wins.

Everything no package changes is the base's, bit for bit (the base is loaded in the packages' dtype, the trained
models', as :func:`~connito.experts.delta.apply_delta` does: a bf16 base merged with fp32 packages is written in
fp32, its values unchanged). The checkpoint (``save_pretrained`` safetensors, the
base's tokenizer files, ``connito_groups.json``: base path and fingerprint, each package's path, manifest sha256,
files and base fingerprint, what it changed, the policy, the overlaps found, the validation record) is written
to a staging directory beside ``out`` and renamed into place only when complete.

**Validation seam.** ``validate`` is called with the staging directory once it holds the complete checkpoint
(weights, config, tokenizer files; the provenance is written after it), before the rename: it loads the
checkpoint as any reader would, measures it, raises to refuse the merge (the staging directory is deleted and
``out`` never appears, or keeps its old contents under ``overwrite``) or returns a JSON-able record kept in
``connito_groups.json`` under ``validation``. It must not write into the directory. Measuring the written files
rather than the in-memory model tests exactly what will be published. :func:`held_out_validator` builds the usual
one: held-out loss per domain of base and merged model on the same rows (:mod:`connito.analysis.held_out`), then
:func:`validate_merge`, which refuses when any domain's merged loss exceeds its base loss by more than
``max_regression`` nats (default :data:`DEFAULT_MAX_REGRESSION` = 0.02 nats/token, about 2 % perplexity; a chosen
default, not a measured bound: each domain's loss should *fall* after its group trained, so a rise on any domain
means another group's experts hurt it, and 0.02 leaves room for the noise of a ~64k-token measurement; give one
per domain once the numbers are known).

Shape legend: D domains (groups), L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed
experts per MoE layer.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
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
from connito.composition.btx_merge import branch_mean
from connito.data.config import DataConfig
from connito.experts import ExpertId, ExpertMask, ExpertView
from connito.experts.delta import Delta, load_delta, read_manifest
from connito.experts.delta.apply import checked_tensors, write_tensors
from connito.experts.delta.manifest import MANIFEST_FILE, file_sha256, parse_dtype
from connito.experts.delta.staging import check_out_dir, copy_tokenizer_files, staged_dir
from connito.experts.mask_file import mask_record, write_mask_file
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

log = logging.getLogger("connito.composition")

SCHEMA = "connito.groups/1"
PROVENANCE_FILE = "connito_groups.json"
MASK_SUFFIX = ".mask.json"
PARTITION_OVERLAPS = ("assign", "refuse")
MERGE_OVERLAPS = ("refuse", "average", "first")
DEFAULT_MAX_REGRESSION = 0.02
"""Nats per token a domain's held-out loss may rise from base to merged model (about 2 % perplexity)."""
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SHOWN = 4
"""Overlapping experts or modules named per pair of packages in an error."""


class GroupMergeError(ModelError):
    """Expert-group packages :func:`merge_groups` cannot merge, or a merge :func:`validate_merge` refuses."""


# -- partition ---------------------------------------------------------------------------------------------------


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
    model = analysis["model"]
    scores = {d: score_table(analysis, source, d) for d in names}
    moe_layers, num_layers = model["moe_layers"], int(model["num_layers"])
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
        if record["model"]["fingerprint"] != model["fingerprint"]:
            raise ModelError(
                f"the analysis {analysis} was computed on another model (fingerprint "
                f"{record['model']['fingerprint'][:19]}...) than base_dir='{base}' ({model['fingerprint'][:19]}...): "
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


# -- merge -------------------------------------------------------------------------------------------------------


@dataclass
class Changes:
    """What one package changes in the base: tensors checked against it, minus those bit-identical to it."""

    experts: dict[ExpertId, dict[str, torch.Tensor]]
    modules: dict[str, torch.Tensor]
    unchanged_experts: list[ExpertId]
    unchanged_modules: list[str]


@dataclass(frozen=True)
class GroupMerge:
    """What :func:`merge_groups` wrote."""

    out: Path
    base_fingerprint: str
    groups: dict[str, ExpertMask]
    """The experts each package changed (overlaps included)."""
    modules: dict[str, list[str]]
    """The non-expert tensors each package changed."""
    overlap: str
    overlaps: dict
    """``{"experts": [{"expert": [layer, expert], "packages": [...]}], "modules": [{"module": ..., "packages":
    [...]}]}``: everything two or more packages change, with the packages in order."""
    validation: dict | None
    record: dict
    """The ``connito_groups.json`` record."""


def merge_groups(
    base: str | Path,
    packages: Mapping[str, str | Path],
    out: str | Path,
    *,
    overlap: str = "refuse",
    overwrite: bool = False,
    validate: Callable[[Path], Mapping | None] | None = None,
) -> GroupMerge:
    """Write base + every package (``{group name: delta package dir}``) as one checkpoint at ``out``. See the
    module docstring for what is refused, the ``overlap`` policies and the ``validate`` seam."""
    if overlap not in MERGE_OVERLAPS:
        raise GroupMergeError(f"overlap={overlap!r} must be one of {list(MERGE_OVERLAPS)}")
    base_dir = Path(base).expanduser().resolve()
    dirs = {name: Path(path).expanduser().resolve() for name, path in packages.items()}
    if not dirs:
        raise GroupMergeError("merge_groups needs at least one package: {group name: delta package directory}")
    for i, (name, path) in enumerate(dirs.items()):
        earlier = [other for other, p in list(dirs.items())[:i] if p == path]
        if earlier:
            raise GroupMergeError(f"packages '{earlier[0]}' and '{name}' are the same directory ({path})")
    inputs = {"the base checkpoint": base_dir, **{f"package '{name}'": path for name, path in dirs.items()}}
    out_dir = check_out_dir(out, overwrite, inputs)
    base_config = validate_checkpoint_dir(base_dir)
    fingerprint = checkpoint_fingerprint(base_dir)
    manifests = {name: read_manifest(path) for name, path in dirs.items()}
    for name, manifest in manifests.items():
        if manifest.base_fingerprint != fingerprint:
            raise GroupMergeError(
                f"foreign group: package '{name}' ({dirs[name]}) was trained from another base (fingerprint "
                f"{manifest.base_fingerprint[:19]}..., at {manifest.base_path or 'an unrecorded path'}) than "
                f"base='{base_dir}' (fingerprint {fingerprint[:19]}...). Merge only packages of jobs started from this "
                "base, or retrain the group on it"
            )
    dtypes = {name: manifest.dtype for name, manifest in manifests.items()}
    if len(set(dtypes.values())) > 1:
        raise GroupMergeError(f"the packages are of different dtypes ({dtypes}): save them in one dtype")
    deltas = {name: load_delta(path) for name, path in dirs.items()}  # sha256 before parsing, then names/shapes/dtypes
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, local_files_only=True, dtype=parse_dtype(next(iter(dtypes.values())))
    )
    changes = {name: package_changes(model, delta) for name, delta in deltas.items()}
    experts, modules, overlaps = resolve_overlaps(changes, overlap)
    write_tensors(model, experts, modules, "the merged expert groups")
    view = ExpertView(model)
    groups = {name: _mask(view, c.experts) for name, c in changes.items()}
    record = {
        "schema": SCHEMA,
        "method": "expert groups: disjoint experts of one base trained as separate jobs, merged onto it",
        "base": {"path": str(base_dir), "fingerprint": fingerprint, "model_type": base_config["model_type"]},
        "packages": {
            name: {
                "path": str(dirs[name]),
                "manifest_sha256": file_sha256(dirs[name] / MANIFEST_FILE),
                "base_fingerprint": manifests[name].base_fingerprint,
                "created": manifests[name].created,
                "files": manifests[name].files,
                "experts": [list(e) for e in groups[name].ids()],
                "modules": sorted(changes[name].modules),
                "carried_unchanged": {
                    "experts": [list(e) for e in changes[name].unchanged_experts],
                    "modules": changes[name].unchanged_modules,
                },
            }
            for name in dirs
        },
        "overlap": overlap,
        "overlaps": overlaps,
        "dtype": next(iter(dtypes.values())),
        "validation": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with staged_dir(out_dir) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(base_dir, stage)
        if validate is not None:
            result = validate(stage)
            record["validation"] = None if result is None else dict(result)
        (stage / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("%d expert groups (%s) merged onto %s into %s", len(dirs), ", ".join(dirs), base_dir, out_dir)
    modules_of = {name: sorted(c.modules) for name, c in changes.items()}
    return GroupMerge(out_dir, fingerprint, groups, modules_of, overlap, overlaps, record["validation"], record)


def package_changes(model: torch.nn.Module, delta: Delta) -> Changes:
    """``delta``'s tensors checked against ``model`` (the base, before anything is written into it), split into
    those that change it and those bit-identical to it."""
    experts, modules = checked_tensors(model, delta, cast=False)
    view, state = ExpertView(model), model.state_dict()
    changed_experts, unchanged_experts = {}, []
    for expert_id, tensors in experts.items():
        live = view.read_expert(expert_id)
        if all(torch.equal(t, live[kind]) for kind, t in tensors.items()):
            unchanged_experts.append(expert_id)
        else:
            changed_experts[expert_id] = tensors
    changed_modules = {name: t for name, t in modules.items() if not torch.equal(t, state[name])}
    unchanged_modules = sorted(set(modules) - set(changed_modules))
    if unchanged_experts or unchanged_modules:
        log.info(
            "%s carries %d experts and %d module tensors equal to the base's: not merged",
            delta.path,
            len(unchanged_experts),
            len(unchanged_modules),
        )
    return Changes(changed_experts, changed_modules, sorted(unchanged_experts), unchanged_modules)


def resolve_overlaps(changes: Mapping[str, Changes], overlap: str):
    """``(experts, modules, overlaps)``: the tensors to write, one per expert and module any package changes,
    with overlaps resolved by ``overlap`` (or refused), and the overlaps found (see :class:`GroupMerge`)."""
    expert_owners: dict[ExpertId, list[str]] = {}
    module_owners: dict[str, list[str]] = {}
    for name, change in changes.items():
        for expert_id in change.experts:
            expert_owners.setdefault(expert_id, []).append(name)
        for module in change.modules:
            module_owners.setdefault(module, []).append(name)
    shared_experts = {e: names for e, names in sorted(expert_owners.items()) if len(names) > 1}
    shared_modules = {m: names for m, names in sorted(module_owners.items()) if len(names) > 1}
    if (shared_experts or shared_modules) and overlap == "refuse":
        raise GroupMergeError(_overlap_message(shared_experts, shared_modules))

    def merged(tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1 or overlap == "first":
            return tensors[0]
        return branch_mean(tensors, len(tensors), tensors[0].dtype)

    experts = {
        expert_id: {
            kind: merged([changes[n].experts[expert_id][kind] for n in names])
            for kind in changes[names[0]].experts[expert_id]
        }
        for expert_id, names in expert_owners.items()
    }
    modules = {module: merged([changes[n].modules[module] for n in names]) for module, names in module_owners.items()}
    overlaps = {
        "experts": [{"expert": list(e), "packages": names} for e, names in shared_experts.items()],
        "modules": [{"module": m, "packages": names} for m, names in shared_modules.items()],
    }
    return experts, modules, overlaps


def _overlap_message(shared_experts: dict, shared_modules: dict) -> str:
    by_pair: dict[tuple[str, ...], tuple[list, list]] = {}
    for expert_id, names in shared_experts.items():
        by_pair.setdefault(tuple(names), ([], []))[0].append(tuple(expert_id))
    for module, names in shared_modules.items():
        by_pair.setdefault(tuple(names), ([], []))[1].append(module)
    parts = []
    for names, (experts, modules) in by_pair.items():
        listed = []
        if experts:
            more = f" and {len(experts) - SHOWN} more" if len(experts) > SHOWN else ""
            listed.append(f"experts {', '.join(map(str, experts[:SHOWN]))}{more}")
        if modules:
            more = f" and {len(modules) - SHOWN} more" if len(modules) > SHOWN else ""
            listed.append(f"modules {modules[:SHOWN]}{more}")
        who = " and ".join(repr(n) for n in names)
        parts.append(f"{who} {'both' if len(names) == 2 else 'all'} change {' and '.join(listed)}")
    return (
        "the packages overlap: " + "; ".join(parts) + ". Expert groups are disjoint: train them on disjoint masks "
        "(partition_experts, write_group_masks), or merge with overlap='average' (elementwise mean of the overlapping "
        "tensors) or overlap='first' (the first package's)"
    )


def _mask(view: ExpertView, experts) -> ExpertMask:
    return ExpertMask.from_ids(experts, view.num_layers, view.num_experts, view.moe_layers)


# -- validation --------------------------------------------------------------------------------------------------


def validate_merge(
    base_losses: Mapping[str, float],
    merged_losses: Mapping[str, float],
    max_regression: float | Mapping[str, float] = DEFAULT_MAX_REGRESSION,
) -> None:
    """Refuse (:class:`GroupMergeError`, with a table of the numbers) when any domain's merged held-out loss exceeds
    its base loss by more than ``max_regression`` nats (one number, or one per domain of ``base_losses``), or is not
    a finite number."""
    domains = list(base_losses)
    missing = [d for d in domains if d not in merged_losses]
    if missing:
        raise GroupMergeError(f"the merged model's losses lack {missing}: measure it on the base's domains {domains}")
    allowed = {}
    for domain in domains:
        limit = max_regression.get(domain) if isinstance(max_regression, Mapping) else max_regression
        if limit is None or not math.isfinite(limit) or limit < 0:
            raise GroupMergeError(
                f"max_regression for '{domain}' is {limit!r}: give a finite number of nats >= 0 for every domain"
            )
        allowed[domain] = float(limit)
    rows, refused = [], []
    for domain in domains:
        base, merged = float(base_losses[domain]), float(merged_losses[domain])
        change = merged - base
        ok = math.isfinite(base) and math.isfinite(merged) and change <= allowed[domain]
        refused += [] if ok else [domain]
        verdict = "ok" if ok else "REFUSED"
        rows.append(f"| {domain} | {base:.4f} | {merged:.4f} | {change:+.4f} | {allowed[domain]:+.4f} | {verdict} |")
    if refused:
        table = "\n".join(["| domain | base | merged | change | allowed | |", "|---|---|---|---|---|---|", *rows])
        raise GroupMergeError(
            f"the merged model's held-out loss rose more than allowed on {', '.join(refused)} (nats per token):\n"
            f"{table}\nThe groups interfere: retrain them on smaller or disjoint-by-routing groups (lower top_p), or "
            "allow more with max_regression (merge.max_regression in `connito groups`)"
        )


def held_out_losses(
    model_dir: str | Path,
    data_cfg: DataConfig,
    domains: Sequence[str],
    eval_tokens: int = 65536,
    *,
    tokenizer_dir: str | Path | None = None,
    micro_batch_size: int = 8,
) -> dict[str, float]:
    """Mean next-token loss (nats) per domain of the checkpoint at ``model_dir`` on about ``eval_tokens`` held-out
    tokens (rows spread evenly over the validation split; :mod:`connito.analysis.held_out`), tokenized with
    ``data_cfg.tokenizer_path``, else ``tokenizer_dir``, else the checkpoint's own tokenizer."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches

    tokenizer = tokenizer_dir or model_dir
    held = held_out_batches(
        data_cfg, tokenizer, domains=list(domains), eval_tokens=eval_tokens, micro_batch_size=micro_batch_size
    )
    return _per_domain(checkpoint_losses(model_dir, held), domains, model_dir)


def held_out_validator(
    base: str | Path,
    data_cfg: DataConfig,
    domains: Sequence[str],
    *,
    eval_tokens: int = 65536,
    max_regression: float | Mapping[str, float] = DEFAULT_MAX_REGRESSION,
    micro_batch_size: int = 8,
) -> Callable[[Path], dict]:
    """A ``validate`` for :func:`merge_groups`: the held-out losses of ``base`` and of the staged merge on the same
    rows (tokenized with the base's tokenizer), then :func:`validate_merge`; returns the numbers it measured."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches

    def validate(stage: Path) -> dict:
        held = held_out_batches(
            data_cfg, base, domains=list(domains), eval_tokens=eval_tokens, micro_batch_size=micro_batch_size
        )
        base_losses = _per_domain(checkpoint_losses(base, held), domains, base)
        merged_losses = _per_domain(checkpoint_losses(stage, held), domains, "the merged model")
        validate_merge(base_losses, merged_losses, max_regression)
        limit = dict(max_regression) if isinstance(max_regression, Mapping) else max_regression
        return {"eval_tokens": eval_tokens, "max_regression": limit, "base": base_losses, "merged": merged_losses}

    return validate


def _per_domain(losses: Mapping[str, float], domains: Sequence[str], what) -> dict[str, float]:
    unknown = [d for d in domains if d not in losses]
    if unknown:
        known = [d for d in losses if d != "all"]
        raise GroupMergeError(f"the held-out data has no domain {unknown} (its domains: {known}); check data.domains")
    empty = [d for d in domains if not math.isfinite(losses[d])]
    if empty:
        raise GroupMergeError(f"{what}: no held-out token of {empty} to measure; give more eval_tokens or data")
    return {d: float(losses[d]) for d in domains}
