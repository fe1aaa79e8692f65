"""Expert groups, last step: merge the group jobs' expert delta packages back onto their base as one checkpoint
(:mod:`connito.composition.expert_groups`).

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
rather than the in-memory model tests exactly what will be published.
:func:`~connito.composition.expert_groups.validation.held_out_validator` builds the usual one: held-out loss per
domain of base and merged model on the same rows (:mod:`connito.analysis.held_out`), then
:func:`~connito.composition.expert_groups.validation.validate_merge`, which refuses when any domain's merged loss
exceeds its base loss by more than ``max_regression`` nats (default
:data:`~connito.composition.expert_groups.validation.DEFAULT_MAX_REGRESSION` = 0.02 nats/token, about 2 %
perplexity; a chosen default, not a measured bound: each domain's loss should *fall* after its group trained, so a
rise on any domain means another group's experts hurt it, and 0.02 leaves room for the noise of a ~64k-token
measurement; give one per domain once the numbers are known).

Shape legend: D domains (groups), L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed
experts per MoE layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from connito.composition.btx_merge import branch_mean
from connito.composition.provenance import GroupsRecord
from connito.experts import ExpertId, ExpertMask, ExpertView
from connito.experts.delta import Delta, load_delta, read_manifest
from connito.experts.delta.apply import checked_tensors, write_tensors
from connito.experts.delta.manifest import MANIFEST_FILE, file_sha256, parse_dtype
from connito.experts.delta.staging import check_out_dir, copy_tokenizer_files, staged_dir
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

log = logging.getLogger("connito.composition")

SCHEMA = GroupsRecord.SCHEMA
PROVENANCE_FILE = GroupsRecord.FILE
MERGE_OVERLAPS = ("refuse", "average", "first")
SHOWN = 4
"""Overlapping experts or modules named per pair of packages in an error."""


class GroupMergeError(ModelError):
    """Expert-group packages :func:`merge_groups` cannot merge, or a merge
    :func:`~connito.composition.expert_groups.validation.validate_merge` refuses."""


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
    record = GroupsRecord(
        method="expert groups: disjoint experts of one base trained as separate jobs, merged onto it",
        base={"path": str(base_dir), "fingerprint": fingerprint, "model_type": base_config["model_type"]},
        packages={
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
        overlap=overlap,
        overlaps=overlaps,
        dtype=next(iter(dtypes.values())),
        validation=None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with staged_dir(out_dir) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(base_dir, stage)
        if validate is not None:
            result = validate(stage)
            record = replace(record, validation=None if result is None else dict(result))
        record.save(stage / PROVENANCE_FILE)
    log.info("%d expert groups (%s) merged onto %s into %s", len(dirs), ", ".join(dirs), base_dir, out_dir)
    modules_of = {name: sorted(c.modules) for name, c in changes.items()}
    return GroupMerge(out_dir, fingerprint, groups, modules_of, overlap, overlaps, record.validation, record.to_dict())


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
