"""The HF export of a DES-MoE run: the adaptive router folded into the family's linear router, and the exact
adaptive router beside it for Connito.

What plain transformers loads (``<run>/hf``): the family's own checkpoint, each MoE layer's router a linear
``[E, H]`` weight again, the adaptive MLPs gone. The fold, per MoE layer:

* **exact** while the MLP's output layer is still zero (``down`` weight and bias all 0: the adaptive router *is*
  its linear part): the trained linear weight is written as it is; routing is bit-identical to the trained model's;
* **least squares** otherwise: the MLP makes the router nonlinear, so no linear router equals it. The export then
  carries the linear router ``W'`` closest to the adaptive logits on the hidden states of calibration tokens
  (``calibration_rows`` validation rows run through the trained model): ``W' = argmin ||H W'^T - L||``, solved in
  float64 (``torch.linalg.lstsq``), where H [N, H] holds the router inputs and L [N, E] the adaptive logits. For
  softmax-scored families L is centred per token first (softmax ignores a per-token shift, so the fit does not
  spend capacity on it); sigmoid-scored families (DeepSeek-V3) fit L as it is. The export reports, per layer, the
  share of calibration tokens whose top-k expert *set* under ``W'`` (routed by the family's rule) equals the adaptive
  router's (``topk_agreement``) and the RMS logit error; it is measured on the calibration tokens themselves.

What Connito loads besides (exact routing): ``des_moe_router.safetensors`` (per MoE layer ``layers.<L>.weight``, the
trained linear part, and ``layers.<L>.adapter.{up,down}.{weight,bias}``) with ``des_moe_router.json`` (the fold
report, the last expert-domain map, the settings). :func:`load_adaptive_router` puts the adaptive routers back on a
model loaded from the export, replacing the folded weights: its routing is then the trained model's. Plain
transformers ignores both files (they are not part of its checkpoint format). safetensors only: loading never
unpickles.

Shape legend: N calibration tokens, H hidden size, E routed experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from connito.adaptation.des_moe.router import ADAPTER, AdaptiveRouters
from connito.common.records import JsonRecord
from connito.experts import ExpertView
from connito.routing.edits import routing_rule

SIDECAR = "des_moe_router.safetensors"
MANIFEST = "des_moe_router.json"
FORMAT = "connito.des_moe_router/1"


@dataclass(frozen=True, kw_only=True)
class DesMoeRouterManifest(JsonRecord):
    """``des_moe_router.json`` (its schema under ``format``): the model type and MoE layers the adaptive routers
    belong to, their width, how each layer's folded router compares, and (from the callback) the run's DES-MoE
    ``config`` and expert ``map``."""

    SCHEMA: ClassVar[str] = FORMAT
    SCHEMA_KEY: ClassVar[str] = "format"
    INDENT: ClassVar[int | None] = 1
    END: ClassVar[str] = ""
    WHAT: ClassVar[str] = "DES-MoE router manifest"
    FIX: ClassVar[str] = "point at the export (<run>/hf) of a run trained with callbacks.des_moe"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"config", "map"})

    model_type: str
    moe_layers: Sequence[int]
    hidden_mult: int
    hf_router: str
    folds: Sequence[Mapping[str, Any]]
    """Per MoE layer, :class:`LayerFold` as a mapping."""
    load: str
    config: Mapping[str, Any] | None = None
    map: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class LayerFold:
    layer: int
    exact: bool
    topk_agreement: float
    """Share of calibration tokens whose top-k set under the folded router equals the adaptive router's."""
    logit_rmse: float
    tokens: int


@torch.no_grad()
def calibration_captures(
    model: nn.Module, routers: AdaptiveRouters, input_ids_NS: torch.Tensor, micro_batch: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (hidden_NH, adapted_logits_NE)}`` (float64, CPU) of every MoE layer over ``input_ids_NS``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hidden: dict[int, list[torch.Tensor]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    routers.take_captures()
    routers.calibrating = True
    try:
        for start in range(0, input_ids_NS.shape[0], micro_batch):
            model(input_ids=input_ids_NS[start : start + micro_batch].to(device))
            for capture in routers.take_captures():
                hidden.setdefault(capture.layer, []).append(capture.hidden_TH.double().cpu())
                logits.setdefault(capture.layer, []).append(capture.logits_TE.double().cpu())
    finally:
        routers.calibrating = False
        model.train(was_training)
    return {layer: (torch.cat(hidden[layer]), torch.cat(logits[layer])) for layer in hidden}


def fold_layer(
    view: ExpertView, layer: int, routers: AdaptiveRouters, hidden_NH: torch.Tensor, logits_NE: torch.Tensor
) -> tuple[torch.Tensor, LayerFold]:
    """The linear router weight [E, H] the export carries for ``layer`` and how close it is (module docstring)."""
    weight = view.router_weight(layer)
    if routers.adapters[layer].is_zero():
        return weight.detach().clone(), LayerFold(layer, True, 1.0, 0.0, hidden_NH.shape[0])
    rule = routing_rule(view, layer)
    target_NE = logits_NE - logits_NE.mean(dim=-1, keepdim=True) if rule.scoring == "softmax" else logits_NE
    folded_HE = torch.linalg.lstsq(hidden_NH, target_NE).solution
    folded_NE = hidden_NH @ folded_HE
    if rule.choice_bias_E is not None:  # route on the CPU copies (the live bias may sit on an accelerator)
        rule = replace(rule, choice_bias_E=rule.choice_bias_E.detach().float().cpu())
    _, ids_adapted = rule.route(logits_NE.float())
    _, ids_folded = rule.route(folded_NE.float())
    agree = (ids_adapted.sort(dim=-1).values == ids_folded.sort(dim=-1).values).all(dim=-1).double().mean()
    rmse = (folded_NE - target_NE).pow(2).mean().sqrt()
    fold = LayerFold(layer, False, float(agree), float(rmse), hidden_NH.shape[0])
    return folded_HE.T.to(weight.dtype).contiguous(), fold


def fold_into_state_dict(
    state_dict: dict[str, torch.Tensor], view: ExpertView, folded: dict[int, torch.Tensor]
) -> None:
    """In place: each MoE layer's router weight becomes ``folded[layer]``, the adaptive MLPs' entries go."""
    for layer, block in view.blocks():
        router = f"{block.prefix}.{view.layout.router_attr}"
        key = f"{router}.weight"
        if key not in state_dict:
            raise KeyError(f"the export's state dict has no '{key}' (the router of layer {layer})")
        state_dict[key] = folded[layer].to(state_dict[key].device)
        for name in [k for k in state_dict if k.startswith(f"{router}.{ADAPTER}.")]:
            del state_dict[name]


def router_tensors(view: ExpertView, routers: AdaptiveRouters) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, adapter in routers.adapters.items():
        tensors[f"layers.{layer}.weight"] = view.router_weight(layer).detach().cpu().contiguous()
        for name, param in adapter.named_parameters():
            tensors[f"layers.{layer}.{ADAPTER}.{name}"] = param.detach().cpu().contiguous()
    return tensors


def write_sidecar(
    export_dir: Path,
    view: ExpertView,
    routers: AdaptiveRouters,
    folds: list[LayerFold],
    *,
    config: Mapping[str, Any] | None = None,
    expert_map: Mapping[str, Any] | None = None,
) -> None:
    """``des_moe_router.safetensors`` and ``des_moe_router.json`` in ``export_dir`` (see the module docstring);
    ``config`` and ``expert_map``: the run's DES-MoE options and expert map, recorded in the manifest."""
    export_dir.mkdir(parents=True, exist_ok=True)
    save_file(router_tensors(view, routers), str(export_dir / SIDECAR))
    DesMoeRouterManifest(
        model_type=view.family.model_type,
        moe_layers=view.moe_layers,
        hidden_mult=routers.hidden_mult,
        hf_router="least-squares fold of the adaptive router (exact where its MLP output layer is zero)",
        folds=[asdict(f) for f in folds],
        load="connito.adaptation.des_moe.export.load_adaptive_router(model, export_dir)",
        config=config,
        map=expert_map,
    ).save(export_dir / MANIFEST)


def load_adaptive_router(model: nn.Module, export_dir: str | Path) -> AdaptiveRouters:
    """Put the trained adaptive routers back on ``model`` (loaded from a DES-MoE export): its routing is then the
    trained model's, not the folded approximation's. Returns the :class:`AdaptiveRouters` (``remove()`` undoes)."""
    export_dir = Path(export_dir)
    if not (export_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{export_dir} has no {MANIFEST}: it is not the export of a DES-MoE run")
    manifest = DesMoeRouterManifest.load(export_dir / MANIFEST)
    view = ExpertView(model)
    if view.moe_layers != list(manifest.moe_layers):
        raise ValueError(
            f"the export's routers are for MoE layers {manifest.moe_layers}; the model has {view.moe_layers}"
        )
    tensors = load_file(str(export_dir / SIDECAR))
    routers = AdaptiveRouters(model, hidden_mult=int(manifest.hidden_mult), view=view)
    expected = set(router_tensors(view, routers))
    if set(tensors) != expected:
        routers.remove()
        raise ValueError(
            f"{SIDECAR}: missing {sorted(expected - set(tensors))[:4]}, "
            f"unexpected {sorted(set(tensors) - expected)[:4]}"
        )
    with torch.no_grad():
        for layer, adapter in routers.adapters.items():
            weight = view.router_weight(layer)
            weight.copy_(tensors[f"layers.{layer}.weight"])
            for name, param in adapter.named_parameters():
                param.copy_(tensors[f"layers.{layer}.{ADAPTER}.{name}"])
            routers.teacher_weights[layer] = weight.detach().clone()
    return routers
