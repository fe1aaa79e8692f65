"""Base checkpoint + delta package -> a full Hugging Face checkpoint that plain transformers loads.

Every check runs before anything is written, in the order that gives the most useful message: the output
directory (never the base, inside it, or holding it), the package (manifest, sha256 of each file), the base's
family and ``config.json`` against the one the delta was trained from, the base's fingerprint, then each tensor's
shape and dtype against the loaded base. The checkpoint is written to a temporary directory and renamed into
place, so a failure leaves no half checkpoint and the base is never touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from connito.experts.addressing import ExpertAddressError, ExpertId
from connito.experts.delta.manifest import SCHEMA, DeltaError, TensorEntry, dtype_name, parse_dtype
from connito.experts.delta.package import Delta, comparable_config, expert_tensor_names, load_delta
from connito.experts.delta.staging import check_out_dir, copy_tokenizer_files, staged_dir
from connito.experts.view import ExpertView
from connito.models.fingerprint import check_fingerprint, checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

log = logging.getLogger("connito.experts")

PROVENANCE_FILE = "connito_delta.json"


def config_differences(delta_config: dict, base_config: dict, limit: int = 6) -> list[str]:
    keys = sorted(set(delta_config) | set(base_config))
    differ = [k for k in keys if delta_config.get(k) != base_config.get(k)]
    return [f"{k}: delta's base {delta_config.get(k)!r}, this base {base_config.get(k)!r}" for k in differ[:limit]]


def check_base(delta: Delta, base: Path, base_config: dict, allow_other_base: bool) -> str:
    """The base is the checkpoint the delta was trained from: same family, same config, same fingerprint (returned).
    ``allow_other_base`` turns a different config or fingerprint into a warning (shapes are still checked)."""
    manifest, what = delta.manifest, f"the delta {delta.path}"
    if base_config["model_type"] != manifest.model_type:
        raise DeltaError(
            f"{what} is for a {manifest.model_type} model, base='{base}' is a {base_config['model_type']}. Apply it "
            f"to the checkpoint it was trained from ({manifest.base_path or 'see its manifest.json'})"
        )
    differences = config_differences(manifest.base_config, comparable_config(base_config))
    if differences and not allow_other_base:
        raise DeltaError(
            f"{what} was trained from a model with another config than base='{base}' "
            f"({'; '.join(differences)}). Apply it to the checkpoint it was trained from "
            f"({manifest.base_path or 'see its manifest.json'})"
        )
    fix = (
        f"Apply it to the checkpoint it was trained from ({manifest.base_path or 'see its manifest.json'}), or pass "
        "allow_other_base=true to put its experts into this model anyway (shapes and dtypes are still checked)"
    )
    if not allow_other_base:
        check_fingerprint(manifest.base_fingerprint, base, what, fix=fix)
        return manifest.base_fingerprint
    fingerprint = checkpoint_fingerprint(base)
    if differences or fingerprint != manifest.base_fingerprint:
        log.warning("%s was trained from another base than %s; applying it anyway (allow_other_base)", what, base)
    return fingerprint


def check_tensor(where: str, got: torch.Tensor, live: torch.Tensor, cast: bool) -> torch.Tensor:
    """``got`` ready to copy into ``live``: same shape always, same dtype unless ``cast`` (an explicit dtype)."""
    if tuple(got.shape) != tuple(live.shape) or (got.dtype != live.dtype and not cast):
        ours = TensorEntry("", tuple(got.shape), dtype_name(got.dtype)).describe()
        theirs = TensorEntry("", tuple(live.shape), dtype_name(live.dtype)).describe()
        fix = (
            "the delta was made for a model of another shape: apply it to the checkpoint it was trained from"
            if tuple(got.shape) != tuple(live.shape)
            else f"pass dtype={dtype_name(live.dtype)} to cast the delta to the base's precision"
        )
        raise DeltaError(f"{where} is {ours} in the delta, {theirs} in the base: {fix}")
    return got.to(live.dtype)


def checked_tensors(
    model: torch.nn.Module, delta: Delta, cast: bool
) -> tuple[dict[ExpertId, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``(experts, modules)``: every tensor of ``delta`` checked against ``model`` (the delta's expert space, each
    expert's tensor kinds, each module's name, every shape; every dtype unless ``cast``) and cast to the model's
    dtype. Nothing is written."""
    view = ExpertView(model)
    mask = delta.manifest.experts
    if mask.shape != (view.num_layers, view.num_experts) or list(mask.moe_layers) != view.moe_layers:
        raise DeltaError(
            f"the delta {delta.path} addresses experts [{mask.shape[0]} layers, {mask.shape[1]} experts] with MoE "
            f"layers {list(mask.moe_layers)}; the base has [{view.num_layers}, {view.num_experts}] with MoE layers "
            f"{view.moe_layers}: it was made for another model"
        )
    state = model.state_dict()
    stacked = expert_tensor_names(model, view)
    experts, modules = {}, {}
    for expert_id, tensors in delta.experts.items():
        live = view.read_expert(expert_id)
        if set(tensors) != set(live):
            raise DeltaError(
                f"the delta's expert {tuple(expert_id)} has tensors {sorted(tensors)}, the base's experts "
                f"{sorted(live)}: the delta was written for another layout"
            )
        where = f"expert {tuple(expert_id)} '{{}}'"
        experts[expert_id] = {k: check_tensor(where.format(k), t, live[k], cast) for k, t in tensors.items()}
    for name, tensor in delta.modules.items():
        if name not in state or name in stacked:
            raise DeltaError(
                f"the delta carries module tensor '{name}', which the base model "
                f"{'holds as routed experts' if name in stacked else 'does not have'}: it was made for another model"
            )
        modules[name] = check_tensor(f"module tensor '{name}'", tensor, state[name], cast)
    return experts, modules


def write_tensors(
    model: torch.nn.Module,
    experts: Mapping[ExpertId, Mapping[str, torch.Tensor]],
    modules: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """Write checked tensors (:func:`checked_tensors`) into ``model``: experts by id, modules by ``state_dict``
    name. ``source`` (what they come from) names the culprit if an expert does not fit."""
    view = ExpertView(model)
    state = model.state_dict()
    try:
        for expert_id, tensors in experts.items():
            view.write_expert(expert_id, tensors)
    except ExpertAddressError as err:
        raise DeltaError(f"{source} does not fit the base: {err}") from None
    with torch.no_grad():
        for name, tensor in modules.items():
            state[name].copy_(tensor)


def write_delta_into(model: torch.nn.Module, delta: Delta, cast: bool) -> None:
    """Check every tensor of ``delta`` against ``model``, then write them all (experts by id, modules by name)."""
    experts, modules = checked_tensors(model, delta, cast)
    write_tensors(model, experts, modules, f"the delta {delta.path}")


def apply_delta(
    base_path: str | Path,
    delta_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    allow_other_base: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write base + delta as a ``save_pretrained`` checkpoint (safetensors, the base's tokenizer files) to
    ``out_dir`` and return it.

    The base is loaded in the delta's dtype (the trained model's), so base + delta reproduces the trained model
    exactly (a bf16 base read as fp32 loses nothing); ``dtype`` loads it in another one and casts the delta to it.
    """
    base = Path(base_path).expanduser().resolve()
    delta_dir = Path(delta_path).expanduser().resolve()
    out = check_out_dir(out_dir, overwrite, {"the base checkpoint": base, "the delta": delta_dir})
    delta = load_delta(delta_dir)
    base_config = validate_checkpoint_dir(base)
    fingerprint = check_base(delta, base, base_config, allow_other_base)
    target = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(
        base, local_files_only=True, dtype=target or parse_dtype(delta.manifest.dtype)
    )
    write_delta_into(model, delta, cast=target is not None)
    with staged_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(base, stage)
        provenance = {
            "schema": SCHEMA,
            "base": {"path": str(base), "fingerprint": fingerprint},
            "delta": {
                "path": str(delta_dir),
                "base_fingerprint": delta.manifest.base_fingerprint,
                "created": delta.manifest.created,
                "files": delta.manifest.files,
            },
            "experts": delta.manifest.experts.to_dict(),
            "modules": delta.manifest.modules,
            "applied": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (stage / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("base %s + delta %s written to %s", base, delta_dir, out)
    return out
