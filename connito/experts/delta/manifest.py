"""The manifest of an expert delta package (``manifest.json``, schema ``connito.delta/1``) and its checks.

A package is a directory of safetensors files plus this manifest::

    {
      "schema": "connito.delta/1",
      "connito_version": "0.1.0",
      "created": "2026-11-23T10:00:00+00:00",
      "base": {"fingerprint": "sha256:...", "model_type": "qwen3_moe", "path": "/where/it/was", "config": {...}},
      "dtype": "float32",
      "experts": {"shape": [3, 8], "moe_layers": [0, 1, 2], "experts": {"0": [], "1": [2, 5], "2": [7]}},
      "modules": ["model.layers.1.mlp.gate.weight"],
      "tensors": {
        "experts.1.2.gate_up_proj": {"file": "experts-layer001.safetensors", "shape": [64, 64], "dtype": "float32"},
        "modules.model.layers.1.mlp.gate.weight": {"file": "modules.safetensors", "shape": [8, 64], ...}
      },
      "files": {"experts-layer001.safetensors": {"sha256": "sha256:...", "bytes": 33280}, ...}
    }

``base.fingerprint`` is :func:`connito.models.fingerprint.checkpoint_fingerprint` of the checkpoint the delta was
trained from; ``base.config`` its ``config.json`` (without ``transformers_version``), so a delta for a model of
another shape is named as such before any weight is read. ``experts`` is an :class:`ExpertMask` in its JSON form.
Tensor keys: ``experts.<layer>.<expert>.<kind>`` (one expert in the transformers form of
:meth:`ExpertView.read_expert`: ``gate_up_proj`` [2I, H], ``down_proj`` [H, I]) and ``modules.<parameter name>``
(a non-expert parameter or buffer, by its name in the transformers model's ``state_dict``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from connito.experts.addressing import ExpertAddressError, ExpertId, ExpertMask
from connito.models.families import ModelError

SCHEMA = "connito.delta/1"
MANIFEST_FILE = "manifest.json"
MODULES_FILE = "modules.safetensors"
EXPERT_KEY = re.compile(r"experts\.(\d+)\.(\d+)\.(\w+)")
CHUNK = 1 << 20


class DeltaError(ModelError):
    """A delta package that is damaged, incomplete, or made for another model; the message names the fix."""


def expert_file(layer: int) -> str:
    return f"experts-layer{layer:03d}.safetensors"


def expert_key(expert_id: ExpertId, kind: str) -> str:
    return f"experts.{expert_id.layer}.{expert_id.expert}.{kind}"


def module_key(name: str) -> str:
    return f"modules.{name}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise DeltaError(f"'{name}' is not a torch dtype (expected a name such as float32 or bfloat16)")
    return dtype


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class TensorEntry:
    file: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


@dataclass
class DeltaManifest:
    """What a delta carries and what it belongs to; :meth:`from_dict` checks that it is complete and consistent."""

    base_fingerprint: str
    model_type: str
    base_config: dict
    experts: ExpertMask
    modules: list[str]
    tensors: dict[str, TensorEntry]
    files: dict[str, dict]
    """File name -> ``{"sha256": "sha256:<hex>", "bytes": n}``."""
    dtype: str
    connito_version: str
    created: str
    base_path: str = ""
    """Where the base was when the delta was written: a hint for error messages, never checked."""
    expert_kinds: list[str] = field(default_factory=list)
    """The tensor kinds each carried expert has (``gate_up_proj``, ``down_proj``), derived from ``tensors``."""

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "connito_version": self.connito_version,
            "created": self.created,
            "base": {
                "fingerprint": self.base_fingerprint,
                "model_type": self.model_type,
                "path": self.base_path,
                "config": self.base_config,
            },
            "dtype": self.dtype,
            "experts": self.experts.to_dict(),
            "modules": list(self.modules),
            "tensors": {
                key: {"file": e.file, "shape": list(e.shape), "dtype": e.dtype}
                for key, e in sorted(self.tensors.items())
            },
            "files": {name: dict(info) for name, info in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> DeltaManifest:
        """Parse and check a manifest; ``where`` (the file) goes into every error message."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            schema = data.get("schema") if isinstance(data, dict) else None
            if isinstance(schema, str) and schema.startswith("connito.delta/"):
                raise DeltaError(
                    f"{where} has schema '{schema}'; this Connito reads '{SCHEMA}'. Apply it with the Connito "
                    "version that wrote it, or re-save the delta with this one"
                )
            raise DeltaError(f'{where} is not a Connito delta manifest (no "schema": "{SCHEMA}")')
        missing = [k for k in ("base", "dtype", "experts", "modules", "tensors", "files") if k not in data]
        base = data.get("base", {})
        missing += [f"base.{k}" for k in ("fingerprint", "model_type", "config") if k not in base]
        if missing:
            raise DeltaError(f"{where} is missing {missing}: the package is incomplete. Write it again with save_delta")
        try:
            experts = ExpertMask.from_dict(data["experts"])
        except ExpertAddressError as err:
            raise DeltaError(f"{where}: 'experts' is not a valid expert mask: {err}") from None
        files = data["files"]
        for name, info in files.items():
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise DeltaError(
                    f"{where}: file '{name}' is not a plain *.safetensors name inside the package (no folder, "
                    "no '..', no absolute path); the package is damaged or was not written by save_delta"
                )
            if not isinstance(info, dict) or not str(info.get("sha256", "")).startswith("sha256:"):
                raise DeltaError(f"{where}: file '{name}' has no sha256 ('sha256:<hex>')")
        tensors = {}
        for key, entry in data["tensors"].items():
            try:
                tensors[key] = TensorEntry(entry["file"], tuple(int(n) for n in entry["shape"]), entry["dtype"])
            except (KeyError, TypeError, ValueError):
                raise DeltaError(f"{where}: tensor '{key}' needs file, shape and dtype, got {entry!r}") from None
            parse_dtype(tensors[key].dtype)
            if tensors[key].file not in files:
                raise DeltaError(f"{where}: tensor '{key}' is in '{tensors[key].file}', which 'files' does not list")
        manifest = cls(
            base_fingerprint=base["fingerprint"],
            model_type=base["model_type"],
            base_config=base["config"],
            experts=experts,
            modules=list(data["modules"]),
            tensors=tensors,
            files=files,
            dtype=data["dtype"],
            connito_version=data.get("connito_version", ""),
            created=data.get("created", ""),
            base_path=base.get("path", ""),
        )
        manifest.expert_kinds = manifest._check_coverage(where)
        return manifest

    def _check_coverage(self, where: str) -> list[str]:
        """Every carried expert and module has its tensors and no tensor is unaccounted for; the expert kinds."""
        kinds_of: dict[ExpertId, set[str]] = {expert_id: set() for expert_id in self.experts.ids()}
        modules = set(self.modules)
        for key in self.tensors:
            match = EXPERT_KEY.fullmatch(key)
            if match:
                expert_id = ExpertId(int(match[1]), int(match[2]))
                if expert_id not in kinds_of:
                    raise DeltaError(f"{where}: tensor '{key}' belongs to expert {tuple(expert_id)}, not in 'experts'")
                kinds_of[expert_id].add(match[3])
            elif key.startswith("modules.") and key.removeprefix("modules.") in modules:
                continue
            else:
                raise DeltaError(f"{where}: tensor '{key}' is neither a carried expert's nor a listed module's")
        missing = [name for name in self.modules if module_key(name) not in self.tensors]
        if missing:
            raise DeltaError(f"{where}: modules {missing} have no tensor")
        kinds = {frozenset(k) for k in kinds_of.values()}
        if frozenset() in kinds or len(kinds) > 1:
            uneven = {tuple(e): sorted(k) for e, k in kinds_of.items()}
            raise DeltaError(f"{where}: carried experts do not all have the same tensors: {uneven}")
        if not kinds_of and not self.modules:
            raise DeltaError(f"{where}: the delta carries no experts and no modules")
        return sorted(next(iter(kinds))) if kinds else []
