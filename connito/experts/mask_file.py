"""The expert-mask file: a set of experts tagged with the model it belongs to, what ``connito select`` writes and
``connito adapt`` and the composition steps read.

Schema ``connito.mask/1`` (JSON)::

    schema      "connito.mask/1"
    model       fingerprint (connito.models.fingerprint), model_type, num_layers, moe_layers, num_experts,
                path (where the model was when the mask was made; informational)
    mask        ExpertMask JSON: shape [num_layers, num_experts], moe_layers, experts {"<layer>": [expert, ...]}
    selection   how the experts were chosen: method, domains, combine, top_p, top_n, experts (method=list),
                source (the analysis.json); descriptive, readers do not interpret it
    counts      per_layer {"<layer>": experts kept}, selected, routed_experts (MoE layers x experts),
                routed_share, parameters: null or {selected, total, share} (the kept experts' weights against the
                whole model's)

:func:`read_mask_file` refuses a file of another model: another fingerprint, or another shape (layers, experts,
MoE layers), each with the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connito.common.atomic import atomic_write_text
from connito.common.records import check_schema
from connito.experts.addressing import ExpertAddressError, ExpertMask
from connito.experts.view import ExpertView, ParameterCount
from connito.models.families import ModelError, get_family

MASK_SCHEMA = "connito.mask/1"
MODEL_KEYS = ("fingerprint", "model_type", "num_layers", "moe_layers", "num_experts")


class MaskFileError(ValueError):
    """A file that is not a readable ``connito.mask/1`` expert mask; the message names the fix."""


@dataclass(frozen=True)
class MaskModel:
    """The ``model`` section: the model the mask belongs to."""

    fingerprint: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    path: str | None = None
    """Where the model was when the mask was made (informational)."""

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "model_type": self.model_type, "num_layers": self.num_layers,
                "moe_layers": list(self.moe_layers), "num_experts": self.num_experts, "path": self.path}  # fmt: skip

    @classmethod
    def from_dict(cls, model: Mapping) -> MaskModel:
        return cls(model["fingerprint"], model["model_type"], int(model["num_layers"]),
                   tuple(int(layer) for layer in model["moe_layers"]), int(model["num_experts"]),
                   model.get("path"))  # fmt: skip


@dataclass(frozen=True)
class MaskCounts:
    """The ``counts`` section: experts kept per MoE layer and in all, and their shares."""

    per_layer: Mapping[str, int]
    selected: int
    routed_experts: int
    routed_share: float
    parameters: Mapping[str, Any] | None = None
    """None, or ``{selected, total, share}``: the kept experts' weights against the whole model's."""

    def to_dict(self) -> dict:
        return {"per_layer": dict(self.per_layer), "selected": self.selected, "routed_experts": self.routed_experts,
                "routed_share": self.routed_share, "parameters": self.parameters}  # fmt: skip


@dataclass(frozen=True)
class MaskFile:
    """One ``connito.mask/1`` file. :meth:`load` reads and checks the file alone; :func:`read_mask_file` also
    checks that it belongs to a given model. :meth:`save` writes it atomically, in the layout :func:`mask_record`
    documents."""

    path: Path | None
    mask: ExpertMask
    model: MaskModel
    selection: Mapping[str, Any]
    """How the experts were chosen (descriptive; readers do not interpret it)."""
    counts: MaskCounts | None

    def to_dict(self) -> dict:
        counts = None if self.counts is None else self.counts.to_dict()
        return {"schema": MASK_SCHEMA, "model": self.model.to_dict(), "mask": self.mask.to_dict(),
                "selection": dict(self.selection), "counts": counts}  # fmt: skip

    @classmethod
    def from_dict(cls, record: Mapping, path: str | Path | None = None) -> MaskFile:
        """The mask file of a parsed record (schema already checked), checked for a well-formed mask of the shape
        its ``model`` section declares."""
        where = path if path is not None else "the mask record"
        try:
            mask = ExpertMask.from_dict(record["mask"])
        except (ExpertAddressError, TypeError, ValueError) as err:
            raise MaskFileError(
                f"{where}: its mask is malformed ({err}); write it again with `connito select`"
            ) from None
        described = record["model"]
        declared = (int(described["num_layers"]), int(described["num_experts"]))
        if mask.shape != declared or list(mask.moe_layers) != sorted(described["moe_layers"]):
            raise MaskFileError(
                f"{where}: the mask covers {_shape_text(*mask.shape, mask.moe_layers)} but the file says its model has "
                f"{_shape_text(*declared, described['moe_layers'])} (edited by hand?); write it again with "
                "`connito select`"
            )
        counts = record.get("counts")
        return cls(
            path=None if path is None else Path(path),
            mask=mask,
            model=MaskModel.from_dict(described),
            selection=dict(record.get("selection") or {}),
            counts=None
            if not counts
            else MaskCounts(
                counts["per_layer"],
                counts["selected"],
                counts["routed_experts"],
                counts["routed_share"],
                counts.get("parameters"),
            ),  # fmt: skip
        )

    @classmethod
    def load(cls, path: str | Path) -> MaskFile:
        """Read the ``connito.mask/1`` file at ``path`` (schema and version checked, mask well formed); it is not
        checked against a model here (:func:`read_mask_file` does)."""
        path = Path(path).expanduser()
        return cls.from_dict(_load(path), path)

    def save(self, path: str | Path) -> Path:
        """Write the file to ``path`` atomically (a reader never sees half a file); returns ``path``."""
        return atomic_write_text(Path(path).expanduser(), _dumps(self.to_dict()) + "\n")


def _redo(model: str) -> str:
    return (
        f"select the experts on this model: `connito analyze model_path={model}`, then "
        "`connito select analysis_path=...`"
    )


def _shape_text(num_layers: int, num_experts: int, moe_layers) -> str:
    return f"{num_layers} layers (MoE layers {list(moe_layers)}) x {num_experts} experts"


# -- writing ---------------------------------------------------------------------------------------------------


def mask_counts(mask: ExpertMask, parameters: ParameterCount | None = None) -> dict:
    """The ``counts`` section: experts kept per MoE layer and in all, and their share of routed experts and (given
    the model's :class:`~connito.experts.ParameterCount`) of its parameters."""
    mask_LE = mask.mask_LE
    routed = len(mask.moe_layers) * mask.shape[1]
    counts = {
        "per_layer": {str(layer): int(mask_LE[layer].sum()) for layer in mask.moe_layers},
        "selected": len(mask),
        "routed_experts": routed,
        "routed_share": round(len(mask) / routed, 6),
        "parameters": None,
    }
    if parameters is not None:
        selected = len(mask) * parameters.per_expert
        total = parameters.non_expert + parameters.num_routed_experts * parameters.per_expert
        counts["parameters"] = {"selected": selected, "total": total, "share": round(selected / total, 6)}
    return counts


def mask_record(mask: ExpertMask, model: dict, selection: dict, parameters: ParameterCount | None = None) -> dict:
    """The ``connito.mask/1`` record of ``mask`` for ``model`` (an analysis.json ``model`` section or any mapping
    with :data:`MODEL_KEYS`)."""
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise MaskFileError(f"the model description lacks {missing}; a mask file needs {list(MODEL_KEYS)}")
    expected = (int(model["num_layers"]), int(model["num_experts"]))
    if mask.shape != expected or list(mask.moe_layers) != sorted(model["moe_layers"]):
        raise ExpertAddressError(
            f"the mask covers {_shape_text(*mask.shape, mask.moe_layers)}, the model "
            f"{_shape_text(*expected, model['moe_layers'])}: build the mask on this model's shape"
        )
    return {
        "schema": MASK_SCHEMA,
        "model": {**{key: model[key] for key in MODEL_KEYS}, "path": model.get("path")},
        "mask": mask.to_dict(),
        "selection": dict(selection),
        "counts": mask_counts(mask, parameters),
    }


def write_mask_file(
    path: str | Path, mask: ExpertMask, model: dict, selection: dict, parameters: ParameterCount | None = None
) -> Path:
    """Write :func:`mask_record` to ``path`` (atomically: a reader never sees half a file)."""
    return MaskFile.from_dict(mask_record(mask, model, selection, parameters)).save(path)


_FLAT_LIST = re.compile(r"\[[^\[\]{}]*\]")


def _one_line(match: re.Match) -> str:
    text = re.sub(r"\[\s*\n\s*", "[", match[0])
    text = re.sub(r"\s*\n\s*\]", "]", text)
    return re.sub(r",\s*\n\s*", ", ", text)


def _dumps(record: dict) -> str:
    """Indented JSON with each list of plain values on one line (a layer's experts read as a row). Only layout
    whitespace changes: a newline is never inside a JSON string."""
    return _FLAT_LIST.sub(_one_line, json.dumps(record, indent=1))


def parameter_count(model_path: str | Path) -> ParameterCount:
    """The parameter counts of the checkpoint at ``model_path``, from its config alone (the model is built on the
    meta device: no weights are read, no memory is used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(model_path).expanduser(), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ExpertView(model).count_parameters()


# -- reading ---------------------------------------------------------------------------------------------------


def read_mask_file(path: str | Path, model: str | Path, *, view: ExpertView | None = None) -> MaskFile:
    """Read a ``connito.mask/1`` file and check that it belongs to ``model``: a checkpoint directory (its config's
    shape, then its fingerprint) or a fingerprint string ``sha256:...``; ``view`` (the live model's
    :class:`~connito.experts.ExpertView`) also checks the MoE layers. Raises :class:`MaskFileError` for a file that
    is no mask file, :class:`~connito.experts.ExpertAddressError` for another shape and
    :class:`~connito.models.ModelError` for another fingerprint."""
    loaded = MaskFile.load(path)
    path, mask, described = loaded.path, loaded.mask, loaded.model
    declared = (described.num_layers, described.num_experts)
    if view is not None:
        actual = (view.num_layers, view.num_experts, list(view.moe_layers))
        if actual != (*declared, list(mask.moe_layers)):
            raise ExpertAddressError(
                f"{path} is a mask for a model of {_shape_text(*declared, mask.moe_layers)}; this model has "
                f"{_shape_text(view.num_layers, view.num_experts, view.moe_layers)}. Use a mask made for this model, "
                f"or {_redo('<this model>')}"
            )
    _check_model(path, described, str(model))
    return loaded


def _load(path: Path) -> dict:
    if not path.is_file():
        raise MaskFileError(f"no mask file at {path}: write one with `connito select analysis_path=... out={path}`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise MaskFileError(
            f"{path} is not UTF-8 text (byte {err.start}); write it again with `connito select`"
        ) from None
    except json.JSONDecodeError as err:
        raise MaskFileError(f"{path} is not valid JSON ({err}); write it again with `connito select`") from None
    if not isinstance(record, dict):
        raise MaskFileError(f"{path} is not a mask file (a JSON object with schema {MASK_SCHEMA!r})")
    if record.get("schema") != MASK_SCHEMA:
        if {"shape", "moe_layers", "experts"} <= set(record):
            raise MaskFileError(
                f"{path} is a bare expert mask with no model fingerprint; make a mask file of it with "
                "`connito select analysis_path=<the model's analysis> method=list experts=[layer:expert,...]`"
            )
        check_schema(record.get("schema"), path, MASK_SCHEMA, what="mask file", error=MaskFileError,
                     fix="select the experts again with `connito select` (it writes a mask file)")  # fmt: skip
    missing = [key for key in MODEL_KEYS if key not in (record.get("model") or {})]
    if missing or "mask" not in record:
        raise MaskFileError(f"{path}: lacks {missing or ['mask']}; write it again with `connito select`")
    return record


def _check_model(path: Path, described: MaskModel, model: str) -> None:
    expected = described.fingerprint
    directory = Path(model).expanduser()
    if model.startswith("sha256:") and not directory.exists():
        if model != expected:
            raise ModelError(
                f"{path} was made for another model (fingerprint {expected[:19]}...), not for the one with "
                f"fingerprint {model[:19]}...: use a mask made for this model, or {_redo('<this model>')}"
            )
        return
    from transformers import AutoConfig

    from connito.models.fingerprint import checkpoint_fingerprint
    from connito.models.loading import validate_checkpoint_dir

    validate_checkpoint_dir(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)  # resolves aliases (num_local_experts)
    family = get_family(config.model_type)
    num_experts = getattr(config, family.layout.num_experts_key, None) if family.is_moe else None
    num_layers = getattr(config, "num_hidden_layers", None)
    declared = (described.num_layers, described.num_experts)
    if num_experts is None or num_layers is None or (int(num_layers), int(num_experts)) != declared:
        has = f"{num_layers} layers x {num_experts} experts" if num_experts is not None else "no routed experts"
        raise ExpertAddressError(
            f"{path} is a mask for a {described.model_type} model of {declared[0]} layers x {declared[1]} "
            f"experts; {directory} ({config.model_type}) has {has}. Use a mask made for this model, or "
            f"{_redo(str(directory))}"
        )
    actual = checkpoint_fingerprint(directory)
    if actual != expected:
        raise ModelError(
            f"{path} was made for another model (fingerprint {expected[:19]}...), not for {directory} "
            f"({actual[:19]}...; same shape, other weights or config). Use a mask made for this model, or "
            f"{_redo(str(directory))}"
        )
