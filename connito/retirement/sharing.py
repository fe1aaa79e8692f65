"""Shared experts from routed ones: take, in every MoE layer, the experts a workload depends on (the driver
experts of Hu et al. 2026's causal scan, or the most-used ones for comparison), merge them into one always-on
shared expert, take them out of routing, and distil the new shared expert against the original layer's output.

**The merge.** For the picked experts P of a layer, with ESFT average gate scores ``g_p`` (the mean routing
weight each gets per token, zero where not chosen), the new shared expert is one expert-shaped SwiGLU MLP whose
``gate_up_proj`` is ``sum_p w_p W_p`` and whose ``down_proj`` is ``s * sum_p w_p D_p``, with ``w_p = g_p / sum g``
and ``s = sum g``: the picked experts' weights averaged by how much routing weight they carried, the output scaled
by the routing weight they carried together, so that on average it adds what they added. (Identical picked
experts merge to that expert times ``s``.)

**The layout.** The shared expert goes into the family's own shared-expert slot, so plain transformers loads the
result: DeepSeek-V2/V3 (``shared_experts``, an MLP of ``n_shared_experts`` expert widths): one more width,
``n_shared_experts + 1``; Qwen2-MoE (``shared_expert`` behind its sigmoid ``shared_expert_gate``): the width
``shared_expert_intermediate_size`` grows by one expert's, and the new part sits behind the same gate, so before
distillation it adds ``sigmoid(gate(x)) * merged(x)``, not ``merged(x)``. The old shared weights are kept as they
were (the new rows and columns are appended). Families without a shared-expert slot (Qwen3-MoE, Mixtral, OLMoE,
FlexOlmo) are refused: converting them to a family with one is not exact (Qwen3-MoE's per-head q/k norms exist in
no transformers family with a softmax router and shared experts) and is left to the user.

**Removal.** The picked experts leave routing through the removal surgery (:func:`remove_experts`): the router
rows and expert slices go, the rest are renumbered, the config's expert count drops by the number picked per layer
(the same in every layer: one config holds one count). Top-k must still fit.

**Distillation.** Layer by layer, the original model's MoE-block inputs ``x`` and outputs ``y`` on calibration
tokens are the data; only the new shared expert's weights train (Adam, full batch), to make the new block's output
match ``y`` in mean squared error. Everything else in the new model is the original's (minus the removed experts).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from connito.analysis.expert_scores import check_domains, load_analysis, score_source, score_table
from connito.analysis.record import AnalysisRecord, as_analysis
from connito.experts import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import model_like
from connito.retirement.records import ShareRecord

log = logging.getLogger("connito.retirement")

PICKS = ("driver", "token", "gate")
SHARED_SLOTS = {
    # model_type: (config key that widens, width it grows by: the routed expert's intermediate size)
    "deepseek_v2": "n_shared_experts",
    "deepseek_v3": "n_shared_experts",
    "qwen2_moe": "shared_expert_intermediate_size",
}


class SharingError(ModelError):
    """A shared-expert build Connito refuses; the message names the fix."""


@dataclass(frozen=True)
class SharePlan:
    picked: dict[int, list[int]]
    """Per MoE layer, the routed experts merged into the shared expert (old numbering)."""
    weights: dict[int, list[float]]
    """Per MoE layer, each picked expert's merge weight ``w_p`` (same order)."""
    scale: dict[int, float]
    """Per MoE layer, the output scale ``s``."""
    pick: str


def pooled_scores(analysis: AnalysisRecord | dict, score: str, domains: list[str] | None) -> torch.Tensor:
    """[MoE layers, experts] of ``score`` pooled over ``domains`` (token-weighted; NaN counts 0)."""
    analysis = as_analysis(analysis)
    source = score_source(score)
    names = check_domains(analysis, source, domains if domains else source.usable(analysis))
    tokens = source.tokens(analysis)
    total = sum(tokens[n] * torch.nan_to_num(score_table(analysis, source, n), nan=0.0) for n in names)
    return total / max(sum(tokens[n] for n in names), 1)


def plan_sharing(
    analysis: AnalysisRecord | dict,
    checkpoint: str | Path,
    per_layer: int,
    pick: str = "driver",
    domains: list[str] | None = None,
) -> SharePlan:
    """Which experts of every MoE layer become the shared expert (the ``per_layer`` best by ``pick``: ``driver``
    score, ``token`` selection ratio or ``gate`` score, pooled over ``domains``), and their merge weights."""
    if pick not in PICKS:
        raise SharingError(f"pick={pick!r}: choose one of {', '.join(PICKS)} (driver: the causal scan's drivers)")
    analysis = as_analysis(analysis)
    fingerprint = checkpoint_fingerprint(checkpoint)
    if analysis.model.fingerprint != fingerprint:
        raise SharingError(
            f"the analysis is of another model ({analysis.model.path}, fingerprint "
            f"{analysis.model.fingerprint[:19]}...), not of {checkpoint} ({fingerprint[:19]}...): its drivers "
            "name other experts. Run `connito analyze model_path=<checkpoint>` and share from that analysis"
        )
    num_experts, top_k = analysis.model.num_experts, analysis.model.top_k
    if per_layer < 1 or num_experts - per_layer < top_k:
        raise SharingError(
            f"per_layer={per_layer}: each MoE layer has {num_experts} experts and routes top-{top_k}, so between 1 "
            f"and {num_experts - top_k} experts per layer can move into the shared expert"
        )
    score_LE = pooled_scores(analysis, pick, domains)
    gate_LE = pooled_scores(analysis, "gate", domains)
    picked, weights, scale = {}, {}, {}
    for i, layer in enumerate(analysis.model.moe_layers):
        experts = score_LE[i].topk(per_layer).indices.tolist()
        mass = gate_LE[i, experts].clamp_min(0.0)
        total = float(mass.sum())
        share = mass / total if total > 0 else torch.full_like(mass, 1.0 / len(experts))
        picked[layer], weights[layer], scale[layer] = experts, share.tolist(), total if total > 0 else 1.0
    return SharePlan(picked, weights, scale, pick)


def merged_expert(view: ExpertView, layer: int, experts: list[int], weights: list[float], scale: float):
    """The merged expert of ``layer`` (see the module docstring): ``gate_up_proj`` [2I, H], ``down_proj`` [H, I]."""
    tensors = [view.read_expert((layer, e)) for e in experts]
    gate_up = sum(w * t["gate_up_proj"].double() for w, t in zip(weights, tensors, strict=True))
    down = scale * sum(w * t["down_proj"].double() for w, t in zip(weights, tensors, strict=True))
    dtype = tensors[0]["gate_up_proj"].dtype
    return {"gate_up_proj": gate_up.to(dtype), "down_proj": down.to(dtype)}


def _shared_slot(model: nn.Module) -> str:
    model_type = model.config.model_type
    if model_type not in SHARED_SLOTS:
        raise SharingError(
            f"{model_type} has no shared-expert slot transformers can load: connito share writes DeepSeek-V2/V3 "
            f"or Qwen2-MoE layouts ({', '.join(SHARED_SLOTS)}). Start from a checkpoint of one of those families"
        )
    return SHARED_SLOTS[model_type]


def build_shared(model: nn.Module, plan: SharePlan) -> nn.Module:
    """A new model: ``plan``'s experts merged into a widened shared expert and removed from routing (``model`` is
    not changed)."""
    from connito.routing.opt_out import remove_experts  # the removal surgery

    key = _shared_slot(model)
    view = ExpertView(model)
    merged = {layer: merged_expert(view, layer, plan.picked[layer], plan.weights[layer], plan.scale[layer])
              for layer in view.moe_layers}  # fmt: skip
    removed = [(layer, e) for layer in view.moe_layers for e in plan.picked[layer]]
    smaller = remove_experts(model, removed)
    config = copy.deepcopy(smaller.config)
    width = merged[view.moe_layers[0]]["down_proj"].shape[1]
    setattr(config, key, getattr(config, key) + (1 if key == "n_shared_experts" else width))
    state = {name: tensor.detach() for name, tensor in smaller.state_dict().items()}
    small_view = ExpertView(smaller)
    for layer in small_view.moe_layers:
        prefix = _module_name(smaller, small_view.shared_experts(layer))
        gate, up = merged[layer]["gate_up_proj"].chunk(2, dim=0)
        for name, extra, dim in (
            ("gate_proj", gate, 0),
            ("up_proj", up, 0),
            ("down_proj", merged[layer]["down_proj"], 1),
        ):
            full = f"{prefix}.{name}.weight"
            state[full] = torch.cat([state[full], extra.to(state[full].dtype)], dim=dim)
    return model_like(smaller, config, state)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def new_shared_slice(view: ExpertView, layer: int, width: int) -> dict[str, torch.Tensor]:
    """The appended part of ``layer``'s shared expert (its last ``width`` intermediate rows): ``gate_up_proj``
    [2I, H], ``down_proj`` [H, I], as :func:`merged_expert` returns them."""
    shared = view.shared_experts(layer)
    gate, up = shared.gate_proj.weight[-width:], shared.up_proj.weight[-width:]
    return {"gate_up_proj": torch.cat([gate, up]).detach(), "down_proj": shared.down_proj.weight[:, -width:].detach()}


def _block_io(model: nn.Module, inputs: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every MoE block's input and output hidden states [N, H] over ``inputs`` (in eval mode, no gradient)."""
    view = ExpertView(model)
    seen: dict[int, tuple[list, list]] = {layer: ([], []) for layer in view.moe_layers}
    hooks = []
    for layer in view.moe_layers:

        def hook(module, args, output, layer=layer):
            out = output[0] if isinstance(output, tuple) else output
            seen[layer][0].append(args[0].reshape(-1, args[0].shape[-1]).detach())
            seen[layer][1].append(out.reshape(-1, out.shape[-1]).detach())

        hooks.append(view.block(layer).module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in inputs:
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {layer: (torch.cat(x), torch.cat(y)) for layer, (x, y) in seen.items()}


def distill_shared(
    original: nn.Module, shared: nn.Module, inputs: list[torch.Tensor], width: int, steps: int, lr: float
) -> dict[int, tuple[float, float]]:
    """Train the appended shared slice of every MoE layer of ``shared`` so its block reproduces ``original``'s
    block output on the original's block inputs; returns per layer the MSE before and after."""
    if steps <= 0:
        return {}
    io = _block_io(original.eval(), inputs)
    view = ExpertView(shared)
    result = {}
    shared.eval()
    for p in shared.parameters():  # each layer's new shared slice is switched on in turn below
        p.requires_grad_(False)
    for layer in view.moe_layers:
        x, y = io[layer]
        block, mlp = view.block(layer).module, view.shared_experts(layer)
        params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        old = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        first = None
        for _ in range(steps):
            optimizer.zero_grad()
            out = block(x.unsqueeze(0))
            out = (out[0] if isinstance(out, tuple) else out).squeeze(0)
            loss = torch.nn.functional.mse_loss(out, y)
            loss.backward()
            with torch.no_grad():  # only the appended slice moves: the old shared weights stay as they were
                for p in params:
                    keep = p.grad.clone()
                    p.grad.zero_()
                    if p is mlp.down_proj.weight:
                        p.grad[:, -width:] = keep[:, -width:]
                    else:
                        p.grad[-width:] = keep[-width:]
            optimizer.step()
            first = float(loss.detach()) if first is None else first
        with torch.no_grad():  # Adam moves nothing whose gradient was always zero, but be exact about it
            for p, o in zip(params, old, strict=True):
                if p is mlp.down_proj.weight:
                    p[:, :-width] = o[:, :-width]
                else:
                    p[:-width] = o[:-width]
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            out = block(x.unsqueeze(0))
            last = float(torch.nn.functional.mse_loss((out[0] if isinstance(out, tuple) else out).squeeze(0), y))
        result[layer] = (first, last)
        log.info("layer %d: shared-expert distillation MSE %.3e -> %.3e", layer, first, last)
    return result


def share_checkpoint(
    checkpoint: str | Path,
    analysis_path: str | Path,
    per_layer: int,
    out_dir: str | Path,
    *,
    pick: str = "driver",
    domains: list[str] | None = None,
    calibration: list[torch.Tensor] | None = None,
    distill_steps: int = 200,
    lr: float = 1e-3,
    overwrite: bool = False,
) -> tuple[Path, SharePlan, dict]:
    """Write the checkpoint at ``checkpoint`` with ``per_layer`` experts of every MoE layer (picked by ``pick``
    from its analysis) merged into its shared expert, removed from routing, and the new shared part distilled on
    ``calibration`` (token-id batches) for ``distill_steps`` Adam steps. Returns the output directory, the plan and
    the per-layer distillation MSE before/after. The input checkpoint is only read; everything is refused before
    anything is written, and ``out_dir`` appears complete or not at all."""

    from transformers import AutoModelForCausalLM

    from connito.experts.delta.staging import check_out_dir, copy_tokenizer_files, staged_dir
    from connito.models.loading import validate_checkpoint_dir

    source = Path(checkpoint).expanduser().resolve()
    out = check_out_dir(out_dir, overwrite, {"the checkpoint": source})
    validate_checkpoint_dir(source)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32).eval()
    _shared_slot(model)
    plan = plan_sharing(load_analysis(analysis_path), source, per_layer, pick, domains)
    shared = build_shared(model, plan)
    view = ExpertView(model)
    width = view.read_expert((view.moe_layers[0], 0))["down_proj"].shape[1]  # one routed expert's width
    mse = distill_shared(model, shared, calibration or [], width, distill_steps, lr) if calibration else {}
    with staged_dir(out) as stage:
        shared.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(source, stage)
        record = ShareRecord(
            source=str(source),
            pick=pick,
            domains=domains or [],
            shared_from={str(k): v for k, v in plan.picked.items()},
            merge_weights={str(k): v for k, v in plan.weights.items()},
            scale={str(k): v for k, v in plan.scale.items()},
            distillation={"steps": distill_steps, "lr": lr, "mse": {str(k): v for k, v in mse.items()}},
        )
        record.save(stage / ShareRecord.FILE)
    log.info("%s: %d experts per layer moved into the shared expert, written to %s", source, per_layer, out)
    return out, plan, mse
