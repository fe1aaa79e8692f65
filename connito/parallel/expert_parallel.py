"""Expert parallelism (``parallel.ep_size=N``) on DeepSpeed AutoEP.

Connito does not implement expert-parallel layers: it asks DeepSpeed's AutoEP (``deepspeed.module_inject.auto_ep``)
to swap each transformers MoE block for an ``AutoEPMoELayer`` at ``deepspeed.initialize``. This module is the seam
between the two:

* :func:`autoep_section` maps a Connito family (transformers ``model_type``) to the ``"expert_parallel"`` section of
  the DeepSpeed config (an AutoEP preset, or AutoEP's custom layer pattern for OLMoE / FlexOlmo);
* :func:`validate_expert_parallel` refuses, before any work starts, what AutoEP or Connito cannot do;
* :func:`gather_hf_state_dict` turns the sharded AutoEP layers back into the family's own transformers state dict
  (every expert, global numbering), for the HF export.

What AutoEP does with the model (deepspeed 0.19.8): every rank keeps the whole non-expert model (embeddings,
attention, norms, router, shared experts) and runs it on its own micro-batch, so **the data-parallel degree of the
batch is the world size**; ranks are grouped in expert-parallel groups of ``ep_size`` consecutive ranks, rank ``r``
of a group holding global experts ``[r * E/N, (r+1) * E/N)`` of every MoE layer as 3-D tensors ``experts.w1``
(gate) [E/N, I, H], ``experts.w3`` (up) [E/N, I, H], ``experts.w2`` (down) [E/N, H, I]. Tokens travel to their
experts by a dropless all-to-all-v inside the group; expert gradients are reduced over the expert-data-parallel
group (the ``world / ep_size`` ranks holding the same experts), all other gradients over the whole world.

Shape legend: E routed experts per MoE layer, N = ep_size, H hidden size, I expert FFN width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import nn

from connito.experts import adapter_for
from connito.models.config import ModelConfig

log = logging.getLogger("connito.parallel")

DEEPSPEED_RANGE = (Version("0.19.8"), Version("0.20"))
"""Tested DeepSpeed versions for AutoEP: 0.19.x from 0.19.8."""
TRANSFORMERS_RANGE = (Version("5.8"), Version("5.23"))
"""Tested transformers versions: >= 5.8, < 5.23 (5.23.0 breaks AutoEP's router-logit recorder retargeting:
``_CanRecordRegistry.get()`` changed signature)."""


class ExpertParallelError(ValueError):
    """An expert-parallel setting that cannot run; the message names the problem and the fix."""


@dataclass(frozen=True)
class AutoEPFamily:
    preset: str | None
    """The AutoEP ``preset_model`` serving this family, or None (custom pattern, or AutoEP cannot serve it)."""
    why_not: str = ""
    custom: dict | None = None
    """AutoEP custom-pattern keys (``moe_layer_pattern`` ...) for a family with no preset. AutoEP's default preset
    adapter does not retarget transformers' router-logit recorder to the replaced router, so Connito computes
    the family's load-balancing loss itself (:mod:`connito.parallel.router_aux`)."""

    @property
    def served(self) -> bool:
        return self.preset is not None or self.custom is not None


# OLMoE / FlexOlmo blocks: ``mlp.gate`` is a router holding ``weight`` [E, H] (softmax over all experts, top-k,
# renormalised only if ``norm_topk_prob``: AutoEP's default adapter reads ``route_norm`` from that config key),
# ``mlp.experts`` holds fused ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I], SwiGLU
# (``hidden_act="silu"``), the routing weight applied to the expert output (``score_apply="post"``).
OLMOE_PATTERN = {
    "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
    "router_pattern": "gate",
    "expert_pattern": "experts",
    "expert_w1": "gate_up_proj",
    "expert_w2": "down_proj",
    "expert_w3": None,
    "num_experts_attr": "num_experts",
    "top_k_attr": "num_experts_per_tok",
    "score_func": "softmax",
    "score_apply": "post",
    "expert_activation": "swiglu",
}

AUTOEP_FAMILIES: dict[str, AutoEPFamily] = {
    "qwen3_moe": AutoEPFamily("qwen3_moe"),
    # AutoEP's qwen3_moe preset lists qwen2_moe among its hf_model_types and carries the gated shared expert
    # (shared_experts_pattern="shared_expert", shared_experts_gate_pattern="shared_expert_gate").
    "qwen2_moe": AutoEPFamily("qwen3_moe"),
    "mixtral": AutoEPFamily("mixtral"),
    "deepseek_v2": AutoEPFamily("deepseek_v2"),
    "deepseek_v3": AutoEPFamily("deepseek_v3"),
    "olmoe": AutoEPFamily(None, custom=OLMOE_PATTERN),
    "flex_olmo": AutoEPFamily(None, custom=OLMOE_PATTERN),
}


def _version(package: str) -> Version:
    return Version(metadata.version(package))


def check_versions(deepspeed_version: Version | None = None, transformers_version: Version | None = None) -> None:
    """Refuse DeepSpeed / transformers versions outside the range AutoEP was tested with."""
    ds = deepspeed_version or _version("deepspeed")
    tf = transformers_version or _version("transformers")
    low, high = DEEPSPEED_RANGE
    if not (low <= ds < high):
        raise ExpertParallelError(
            f"parallel.ep_size>1 runs on DeepSpeed AutoEP, tested with deepspeed >={low},<{high}; installed "
            f"deepspeed=={ds}. Install a tested version (pip install 'deepspeed>={low},<{high}') or set "
            "parallel.ep_size=1"
        )
    low, high = TRANSFORMERS_RANGE
    if not (low <= tf < high):
        raise ExpertParallelError(
            f"parallel.ep_size>1 runs on DeepSpeed AutoEP, tested with transformers >={low},<{high}; installed "
            f"transformers=={tf} (5.23.0 breaks AutoEP's router-logit capture). Install a tested version "
            f"(pip install 'transformers>={low},<{high}') or set parallel.ep_size=1"
        )


def num_routed_experts(model: ModelConfig) -> int:
    """Routed experts per MoE layer of the model a config describes, without building the model."""
    from transformers import AutoConfig

    from connito.models.loading import resolve_family, validate_checkpoint_dir

    family = resolve_family(model)
    key = adapter_for(family.model_type).layout.num_experts_key
    if model.path:
        config = validate_checkpoint_dir(model.path)
        if key in config:
            return int(config[key])
        return int(getattr(AutoConfig.from_pretrained(model.path, local_files_only=True), key))
    if key in model.hf_config:
        return int(model.hf_config[key])
    return int(getattr(AutoConfig.for_model(family.model_type, **model.hf_config), key))


def validate_expert_parallel(
    ep_size: int, world_size: int, model_type: str, num_experts: int, zero_stage: int, check_installed: bool = True
) -> None:
    """Every check that needs no model: run it before data preparation and model building."""
    if ep_size < 1:
        raise ExpertParallelError(
            f"parallel.ep_size={ep_size} must be a positive integer (1 turns expert parallelism off)"
        )
    if ep_size == 1:
        return
    family = AUTOEP_FAMILIES.get(model_type)
    if family is None or not family.served:
        why = family.why_not if family else "Connito has no AutoEP mapping for it"
        served = ", ".join(sorted(k for k, v in AUTOEP_FAMILIES.items() if v.served))
        raise ExpertParallelError(
            f"parallel.ep_size={ep_size}: DeepSpeed AutoEP cannot run family '{model_type}': {why}. Set "
            f"parallel.ep_size=1 for this family, or train one AutoEP serves ({served})"
        )
    if world_size % ep_size:
        raise ExpertParallelError(
            f"parallel.ep_size={ep_size} does not divide the world size {world_size}: expert-parallel groups are "
            f"ep_size consecutive ranks. Launch a multiple of {ep_size} ranks, or set parallel.ep_size to a divisor "
            f"of {world_size} ({', '.join(str(d) for d in _divisors(world_size))})"
        )
    if num_experts % ep_size:
        raise ExpertParallelError(
            f"parallel.ep_size={ep_size} does not divide the {num_experts} routed experts per MoE layer of the "
            f"model: every rank must hold the same number of experts. Set parallel.ep_size to a divisor of "
            f"{num_experts} ({', '.join(str(d) for d in _divisors(num_experts))})"
        )
    if zero_stage == 3:
        raise ExpertParallelError(
            f"parallel.ep_size={ep_size} with engine.zero_stage=3 is not supported by Connito: its HF export and "
            "checkpoints gather AutoEP experts that ZeRO-3 would also partition over the expert-data-parallel "
            "group, which is not implemented or tested. Use engine.zero_stage=0, 1 or 2 with expert parallelism"
        )
    if check_installed:
        check_versions()


def autoep_section(model_type: str, ep_size: int) -> dict | None:
    """The DeepSpeed config's ``"expert_parallel"`` section, or None for ``ep_size == 1`` (plain HF blocks)."""
    if ep_size == 1:
        return None
    family = AUTOEP_FAMILIES.get(model_type)
    if family is None or not family.served:  # validate_expert_parallel explains; keep this total
        raise ExpertParallelError(f"DeepSpeed AutoEP cannot run family '{model_type}'")
    if family.preset is None:
        return {"enabled": True, "autoep_size": ep_size, **family.custom}
    return {"enabled": True, "autoep_size": ep_size, "preset_model": family.preset}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- the replaced model ------------------------------------------------------------------------------------------


def autoep_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> ``AutoEPMoELayer`` of every MoE block AutoEP replaced (empty without AutoEP)."""
    try:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, AutoEPMoELayer)}


def is_expert_parallel(model: nn.Module) -> bool:
    return bool(autoep_layers(model))


def local_parameter_count(model: nn.Module) -> int:
    """Parameters this rank holds (shared modules counted once)."""
    return sum(p.numel() for p in model.parameters())


def _gather_experts(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the [E/N, ...] shards of an expert-parallel group in group-rank order: [E, ...]."""
    size = dist.get_world_size(group=group)
    if size == 1:
        return tensor.detach().clone()
    local = tensor.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=group)
    return torch.cat(shards, dim=0)


def gather_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full transformers state dict, every routed expert included (global numbering).

    Collective over each expert-parallel group: every rank must call it. Returns CPU tensors under the family's
    own transformers names (``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
    [E, H, I], shared experts under their family names), ready for ``load_state_dict(strict=True)`` into a fresh
    model of the same config. Without AutoEP layers it is the plain state dict.
    """
    layers = autoep_layers(model)
    layout = adapter_for(model).layout
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for prefix, layer in layers.items():
        for key in [k for k in state if k.startswith(prefix + ".")]:
            del state[key]
        if layer.ep_group is None:
            raise RuntimeError(
                f"AutoEP layer {prefix} has no expert-parallel group: run it through deepspeed.initialize"
            )
        expected = list(range(layer.ep_rank * layer.num_local_experts, (layer.ep_rank + 1) * layer.num_local_experts))
        from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

        held = list(autoep_experts_for_rank(layer.expert_placement_descriptor, layer.ep_rank))
        if held != expected:
            raise RuntimeError(
                f"AutoEP layer {prefix} places experts {held} on ep rank {layer.ep_rank}; Connito's export expects "
                f"the uniform contiguous placement {expected}"
            )
        w1 = _gather_experts(layer.experts.w1, layer.ep_group).cpu()  # gate [E, I, H]
        w3 = _gather_experts(layer.experts.w3, layer.ep_group).cpu()  # up   [E, I, H]
        w2 = _gather_experts(layer.experts.w2, layer.ep_group).cpu()  # down [E, H, I]
        experts = f"{prefix}.{layout.experts_attr}"
        state[f"{experts}.gate_up_proj"] = torch.cat([w1, w3], dim=1)  # [E, 2I, H]: gate rows first
        state[f"{experts}.down_proj"] = w2
        router = f"{prefix}.{layout.router_attr}"
        for name, tensor in layer.router.gate.state_dict().items():
            state[f"{router}.{name}"] = tensor.detach().cpu().clone()
        bias = getattr(layer.router, "e_score_correction_bias", None)
        if bias is not None:
            state[f"{router}.e_score_correction_bias"] = bias.detach().cpu().clone()
        for module, attr in (
            (layer.shared_experts, layout.shared_experts_attr),
            (layer.shared_experts_gate, layout.shared_expert_gate_attr),
        ):
            if module is None:
                continue
            if attr is None:
                raise RuntimeError(f"AutoEP layer {prefix} has shared experts the {layout} adapter does not name")
            for name, tensor in module.state_dict().items():
                state[f"{prefix}.{attr}.{name}"] = tensor.detach().cpu().clone()
    return state


def to_hf_layout(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit gathered expert tensors to the reference model's fused layout (some transformers classes store
    ``gate_up_proj`` as [E, H, 2I] and ``down_proj`` as [E, I, H])."""
    out = dict(state)
    for key, tensor in state.items():
        target = reference.get(key)
        if target is None or tuple(target.shape) == tuple(tensor.shape):
            continue
        if key.endswith(".gate_up_proj") or key.endswith(".down_proj"):
            flipped = tensor.transpose(1, 2).contiguous()  # [E, 2I, H] gate-then-up -> [E, H, 2I] gate-then-up
            if tuple(flipped.shape) == tuple(target.shape):
                out[key] = flipped
    return out


def build_hf_model(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh transformers model of ``model``'s config holding ``state`` (strict: every key must match)."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype if state else torch.float32
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    reference = fresh.state_dict()
    state = to_hf_layout(state, reference)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied weights (lm_head <- embed_tokens) may be absent from one side; anything else is a mapping error.
    tied = {k for k in missing if k in reference and any(reference[k] is v for j, v in reference.items() if j != k)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"gathered expert-parallel state does not fit {type(fresh).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    return fresh.eval()
