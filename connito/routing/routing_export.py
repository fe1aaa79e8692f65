"""The HF export of a run trained with a routing mode, and how Connito puts the trained route back on it.

What plain transformers loads (``<run>/hf``): the family's own checkpoint, weights unchanged (experts, router,
shared experts), the routing modules' entries dropped from it. **It routes top-k**, the family's way: transformers
has no Expert Choice or threshold routing, so ``AutoModelForCausalLM.from_pretrained(<run>/hf)`` gives the trained
weights under a route they were not trained with (top-k with the family's renormalisation instead of each expert's
capacity share, unnormalised). Its outputs differ from the trained model's; how much is an empirical question per
model (``benchmarks/routing_modes.py`` measures it as the "export loaded top-k" row).

What Connito loads besides (the trained route): ``routing_state.safetensors`` (per MoE layer ``layers.<L>.<name>``:
Expert Choice's predictor ``predictor.linear.{weight,bias}`` and its calibrated thresholds
``predictor.calibration.{threshold_E,updates}``; threshold routing's ``threshold.{threshold_E,updates}``) and
``routing_state.json`` (format, mode and options, model type, MoE layers). :func:`load_routing_mode` installs the
mode on a model loaded from the export and restores that state; in eval mode the model then routes exactly as the
trained model's validation did (Expert Choice by its causal predictor route)::

    model = AutoModelForCausalLM.from_pretrained("runs/ec/hf").eval()
    routing = load_routing_mode(model, "runs/ec/hf")      # routing.remove() gives top-k back

The files are named ``routing_state.*``, not ``connito_*.json``: a later run that starts from this export copies
``connito_*.json`` provenance files into its own export (:func:`connito.training.export.carry_provenance`), and a
route state belongs to these weights only. safetensors only: loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

from connito.common.records import JsonRecord
from connito.routing.routing_modes import RoutingModes, RoutingOptions

SIDECAR = "routing_state.safetensors"
MANIFEST = "routing_state.json"
FORMAT = "connito.routing_state/1"


@dataclass(frozen=True, kw_only=True)
class RoutingStateManifest(JsonRecord):
    """``routing_state.json`` (its schema under ``format``): the mode and options, the model type and MoE layers
    the state belongs to."""

    SCHEMA: ClassVar[str] = FORMAT
    SCHEMA_KEY: ClassVar[str] = "format"
    INDENT: ClassVar[int | None] = 1
    END: ClassVar[str] = ""
    WHAT: ClassVar[str] = "routing-state manifest"
    FIX: ClassVar[str] = (
        "point at the export (<run>/hf) of a run trained with callbacks.expert_choice or callbacks.expert_threshold"
    )

    options: Mapping[str, Any]
    model_type: str
    moe_layers: Sequence[int]
    hf_route: str
    load: str


def write_routing_state(export_dir: str | Path, routing: RoutingModes) -> None:
    """``routing_state.safetensors`` and ``routing_state.json`` in ``export_dir`` (see the module docstring)."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    save_file(routing.state_tensors(), str(export_dir / SIDECAR))
    RoutingStateManifest(
        options=routing.options.to_dict(),
        model_type=routing.view.family.model_type,
        moe_layers=routing.view.moe_layers,
        hf_route="plain transformers loads these weights and routes them top-k, not as trained",
        load="connito.routing.routing_export.load_routing_mode(model, export_dir)",
    ).save(export_dir / MANIFEST)


def load_routing_mode(model: nn.Module, export_dir: str | Path) -> RoutingModes:
    """Install the trained routing mode of ``export_dir`` on ``model`` (loaded from that export) with its trained
    predictor and thresholds. Returns the :class:`RoutingModes` (``remove()`` undoes)."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{export_dir} has no {MANIFEST}: it is not the export of a run trained with a routing mode "
            "(callbacks.expert_choice or callbacks.expert_threshold); load it with plain transformers"
        )
    manifest = RoutingStateManifest.load(export_dir / MANIFEST)
    model_type = getattr(model.config, "model_type", None)
    if model_type != manifest.model_type:
        raise ValueError(f"the routing state is for a {manifest.model_type} model; this model is {model_type}")
    routing = RoutingModes(model, RoutingOptions(**manifest.options))
    if routing.view.moe_layers != list(manifest.moe_layers):
        routing.remove()
        raise ValueError(
            f"the routing state is for MoE layers {manifest.moe_layers}; the model has {routing.view.moe_layers}"
        )
    try:
        routing.load_state_tensors(load_file(str(export_dir / SIDECAR)))
    except Exception:
        routing.remove()
        raise
    return routing
