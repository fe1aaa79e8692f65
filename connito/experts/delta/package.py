"""Write and read expert delta packages: only what a run trained, as safetensors plus ``manifest.json``.

:func:`save_delta` takes the trained transformers model, the base checkpoint it was trained from, the experts it
trained (an :class:`ExpertMask`) and globs of the non-expert tensors it trained (routers, shared experts).
:func:`load_delta` checks the manifest and the sha256 of every file, then reads the tensors with safetensors
(never ``torch.load``: loading a delta never unpickles). :func:`changed_experts` and :func:`changed_modules` say
what differs between a trained model and its base, for a caller that did not keep its mask.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import connito
from connito.experts.addressing import ExpertId, ExpertMask
from connito.experts.delta.manifest import (
    MANIFEST_FILE,
    MODULES_FILE,
    SCHEMA,
    DeltaError,
    DeltaManifest,
    TensorEntry,
    dtype_name,
    expert_file,
    expert_key,
    file_sha256,
    module_key,
)
from connito.experts.delta.staging import check_out_dir, staged_dir
from connito.experts.view import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

log = logging.getLogger("connito.experts")


@dataclass
class Delta:
    """A checked delta package in memory."""

    path: Path
    manifest: DeltaManifest
    experts: dict[ExpertId, dict[str, torch.Tensor]]
    """One entry per carried expert, in transformers form (what :meth:`ExpertView.write_expert` takes)."""
    modules: dict[str, torch.Tensor]
    """Parameter (or buffer) name in the transformers model -> tensor."""


def comparable_config(config: dict) -> dict:
    """A ``config.json`` without the writer's transformers version (the same rule as the fingerprint)."""
    return {k: v for k, v in config.items() if k != "transformers_version"}


def expert_tensor_names(model: nn.Module, view: ExpertView) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for _, block in view.blocks() for p in block.stacked_params().values()}


def resolve_modules(model: nn.Module, patterns: Sequence[str], view: ExpertView) -> list[str]:
    """The ``state_dict`` names ``patterns`` (fnmatch globs) select; routed expert tensors may not be among them."""
    names = list(model.state_dict())
    stacked = expert_tensor_names(model, view)
    selected: set[str] = set()
    for pattern in patterns:
        matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            hint = [name for name in names if ".layers.1." in name][:6] or names[:6]
            raise ModelError(f"modules pattern '{pattern}' matches no tensor of the model; names look like {hint}")
        fused = sorted(set(matches) & stacked)
        if fused:
            raise ModelError(
                f"modules pattern '{pattern}' matches routed expert tensors {fused[:3]}: carry routed experts with "
                "the experts mask (one tensor per expert), and give modules only for non-expert tensors"
            )
        selected.update(matches)
    return sorted(selected)


def save_delta(
    model: nn.Module,
    base_path: str | Path,
    out_dir: str | Path,
    experts: ExpertMask,
    modules: Sequence[str] = (),
    *,
    overwrite: bool = False,
) -> DeltaManifest:
    """Write the ``experts`` and the ``modules`` (globs over ``model.state_dict()`` names) of the trained ``model``
    as a delta of the checkpoint at ``base_path`` (the one training started from) into ``out_dir``.

    ``model`` is a plain transformers model (an expert-parallel one: export it first). Tensors keep the model's
    dtype; the manifest records it, and :func:`apply_delta` loads the base in that dtype by default.
    """
    base_path = Path(base_path).expanduser().resolve()
    out = check_out_dir(out_dir, overwrite, {"the base checkpoint": base_path})
    base_config = validate_checkpoint_dir(base_path)
    view = ExpertView(model)
    if view.is_sharded:
        raise ModelError(
            "save_delta needs the whole model in this process; this one is expert-parallel "
            f"(ep_size={view.ep_size}). Export it to a transformers checkpoint first and save the delta from that"
        )
    if base_config["model_type"] != view.family.model_type:
        raise ModelError(
            f"the model is a {view.family.model_type}, the base checkpoint {base_path} a {base_config['model_type']}: "
            "pass the checkpoint this model was trained from as base_path"
        )
    if experts.shape != (view.num_layers, view.num_experts) or list(experts.moe_layers) != view.moe_layers:
        raise ModelError(
            f"the experts mask has shape {experts.shape} with MoE layers {list(experts.moe_layers)}; the model has "
            f"[{view.num_layers}, {view.num_experts}] with MoE layers {view.moe_layers}. Build it with "
            "ExpertView(model).empty_mask()"
        )
    module_names = resolve_modules(model, modules, view)
    if not len(experts) and not module_names:
        raise ModelError("save_delta: no experts and no modules selected; a delta has to carry something")

    files: dict[str, dict[str, torch.Tensor]] = {}
    for expert_id in experts.ids():
        for kind, tensor in view.read_expert(expert_id).items():
            files.setdefault(expert_file(expert_id.layer), {})[expert_key(expert_id, kind)] = tensor.cpu().contiguous()
    state = model.state_dict()
    for name in module_names:
        files.setdefault(MODULES_FILE, {})[module_key(name)] = state[name].detach().to("cpu", copy=True).contiguous()
    dtypes = {t.dtype for tensors in files.values() for t in tensors.values()}
    model_dtype = getattr(model, "dtype", None) or dtypes.pop()

    manifest = DeltaManifest(
        base_fingerprint=checkpoint_fingerprint(base_path),
        model_type=view.family.model_type,
        base_config=comparable_config(base_config),
        experts=experts,
        modules=module_names,
        tensors={
            key: TensorEntry(file, tuple(t.shape), dtype_name(t.dtype))
            for file, tensors in files.items()
            for key, t in tensors.items()
        },
        files={},
        dtype=dtype_name(model_dtype),
        connito_version=connito.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        base_path=str(base_path),
    )
    with staged_dir(out) as stage:
        for file, tensors in files.items():
            save_file(tensors, stage / file, metadata={"format": "pt", "schema": SCHEMA})
            manifest.files[file] = {"sha256": file_sha256(stage / file), "bytes": (stage / file).stat().st_size}
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    log.info("delta of %d experts and %d module tensors written to %s", len(experts), len(module_names), out)
    return manifest


def read_manifest(path: str | Path) -> DeltaManifest:
    """The checked manifest of the package at ``path`` (no tensor read, no hash computed)."""
    path = Path(path).expanduser()
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise DeltaError(f"delta='{path}' is not a delta package: it has no {MANIFEST_FILE}. Write one with save_delta")
    try:
        data = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise DeltaError(f"{manifest_file} is not valid JSON ({err}); the package is damaged") from None
    return DeltaManifest.from_dict(data, str(manifest_file))


def check_file(path: Path, name: str, sha256: str, expected: set[str]) -> None:
    """``name`` in the package at ``path`` is a file with the manifest's ``sha256`` whose header names exactly the
    tensors ``expected`` (the manifest's for it). Reads the header only, no tensor."""
    file = path / name
    if not file.is_file():
        raise DeltaError(f"delta='{path}' is missing '{name}', which its manifest lists. Copy the package again")
    actual = file_sha256(file)
    if actual != sha256:
        raise DeltaError(
            f"delta='{path}': '{name}' has sha256 {actual[:19]}..., the manifest says {sha256[:19]}...: "
            "the file changed after the delta was written (damaged or edited). Copy the package again from its "
            "source, or write it again with save_delta"
        )
    try:
        with safe_open(file, "pt") as handle:
            names = set(handle.keys())
    except SafetensorError as err:
        raise DeltaError(f"delta='{path}': '{name}' is not a readable safetensors file ({err})") from None
    if names - expected:
        raise DeltaError(
            f"delta='{path}': '{name}' holds tensors {sorted(names - expected)} that its manifest does not list; "
            "the package was not written by save_delta. Write it again with save_delta"
        )
    if expected - names:
        raise DeltaError(
            f"delta='{path}': '{name}' lacks tensors {sorted(expected - names)} that its manifest lists there"
        )


def load_delta(path: str | Path) -> Delta:
    """Read a delta package: manifest checked, nothing in the folder but the manifest and the files it lists, every
    file's sha256 and tensor names (from its header) checked before any tensor is read, then every tensor's shape
    and dtype checked against the manifest. Safetensors only: nothing is unpickled."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_FILE and p.name not in manifest.files)
    if unlisted:
        raise DeltaError(
            f"delta='{path}' holds {unlisted}, which its manifest does not list (a package is {MANIFEST_FILE} and "
            "the files it lists); remove them"
        )
    for name, info in sorted(manifest.files.items()):
        check_file(path, name, info["sha256"], {k for k, e in manifest.tensors.items() if e.file == name})
    loaded: dict[str, torch.Tensor] = {}
    for name in sorted(manifest.files):
        try:
            loaded.update(load_file(path / name))
        except SafetensorError as err:
            raise DeltaError(f"delta='{path}': '{name}' is not a readable safetensors file ({err})") from None
    for key, entry in manifest.tensors.items():
        got = TensorEntry(entry.file, tuple(loaded[key].shape), dtype_name(loaded[key].dtype))
        if got != entry:
            raise DeltaError(f"delta='{path}': '{key}' is {got.describe()}, the manifest says {entry.describe()}")
    experts = {
        expert_id: {kind: loaded[expert_key(expert_id, kind)] for kind in manifest.expert_kinds}
        for expert_id in manifest.experts.ids()
    }
    modules = {name: loaded[module_key(name)] for name in manifest.modules}
    return Delta(path, manifest, experts, modules)


def changed_experts(model: nn.Module, base_model: nn.Module) -> ExpertMask:
    """The routed experts whose tensors differ (bitwise) between ``model`` and ``base_model`` (same architecture)."""
    view, base_view = ExpertView(model), ExpertView(base_model)
    mask = view.empty_mask()
    for layer in view.moe_layers:
        for expert in range(view.num_experts):
            ours, theirs = view.read_expert((layer, expert)), base_view.read_expert((layer, expert))
            if any(not torch.equal(ours[kind], theirs[kind]) for kind in ours):
                mask.set((layer, expert))
    return mask


def changed_modules(model: nn.Module, base_model: nn.Module) -> list[str]:
    """Names of the non-expert ``state_dict`` tensors that differ (bitwise) between ``model`` and ``base_model``."""
    stacked = expert_tensor_names(model, ExpertView(model))
    base_state = base_model.state_dict()
    return sorted(
        name
        for name, tensor in model.state_dict().items()
        if name not in stacked and not torch.equal(tensor, base_state[name])
    )
