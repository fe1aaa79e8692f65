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
from importlib import metadata

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import nn

from connito.experts import ExpertView, autoep_layer_class
from connito.experts.autoep_mapping import to_hf_state
from connito.models.config import ModelConfig
from connito.models.families import ModelError, get_family, moe_families

log = logging.getLogger("connito.parallel")

DEEPSPEED_VERSION = Version("0.19.8")
"""The DeepSpeed Connito is tested with (setup.py pins it): its AutoEP, and the private ZeRO stage-0 checkpoint
files :mod:`connito.training.relayout_zero0` re-lays."""
TRANSFORMERS_RANGE = (Version("5.8"), Version("5.23"))
"""transformers versions AutoEP ran with (setup.py pins 5.22.2, the one the test suite runs): >= 5.8, < 5.23
(5.23.0 breaks AutoEP's router-logit recorder retargeting: ``_CanRecordRegistry.get()`` changed signature)."""


class ExpertParallelError(ValueError):
    """An expert-parallel setting that cannot run; the message names the problem and the fix."""


def _version(package: str) -> Version:
    return Version(metadata.version(package))


def check_versions(deepspeed_version: Version | None = None, transformers_version: Version | None = None) -> None:
    """Refuse DeepSpeed / transformers versions outside the range AutoEP was tested with."""
    ds = deepspeed_version or _version("deepspeed")
    tf = transformers_version or _version("transformers")
    if ds != DEEPSPEED_VERSION:
        raise ExpertParallelError(
            f"parallel.ep_size>1 runs on DeepSpeed AutoEP, tested with deepspeed=={DEEPSPEED_VERSION}; installed "
            f"deepspeed=={ds}. Install it (pip install 'deepspeed=={DEEPSPEED_VERSION}') or set parallel.ep_size=1"
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
    if not family.is_moe:
        return 0
    key = family.layout.num_experts_key
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
    try:
        family = get_family(model_type)
    except ModelError:
        family = None
    if family is None or family.autoep is None:
        why = "Connito has no AutoEP mapping for it"
        if family is not None and not family.is_moe:
            why = "it is a dense model (no experts to split)"
        elif family is not None and family.notes:
            why = family.notes
        served = ", ".join(f for f in moe_families() if get_family(f).autoep is not None)
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
    family = get_family(model_type)
    if family.autoep is None:  # validate_expert_parallel explains; keep this total
        raise ExpertParallelError(f"DeepSpeed AutoEP cannot run family '{model_type}'")
    return family.autoep.section(ep_size)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- the replaced model ------------------------------------------------------------------------------------------


def autoep_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> ``AutoEPMoELayer`` of every MoE block AutoEP replaced (empty when DeepSpeed never loaded
    AutoEP, so no model can hold one)."""
    autoep = autoep_layer_class()
    if autoep is None:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, autoep)}


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
    own transformers names (the mapping of :mod:`connito.experts.autoep_mapping`), ready for
    ``load_state_dict(strict=True)`` into a fresh model of the same config. Without AutoEP layers it is the plain
    state dict.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if not is_expert_parallel(model):
        return state
    view = ExpertView(model)
    blocks = []
    for _, block in view.blocks():
        if block.ep_group is None:
            raise RuntimeError(
                f"AutoEP layer {block.prefix} has no expert-parallel group: run it through deepspeed.initialize"
            )
        blocks.append(block.prefix)
        for name, param in block.stacked_params().items():
            state[f"{block.prefix}.experts.{name}"] = _gather_experts(param, block.ep_group).cpu()
    return to_hf_state(state, blocks, view.layout)


def build_hf_model(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh transformers model of ``model``'s config holding ``state`` (strict: every key must match)."""
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype if state else torch.float32
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    reference = fresh.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied weights (lm_head <- embed_tokens) may be absent from one side; anything else is a mapping error.
    tied = {k for k in missing if k in reference and any(reference[k] is v for j, v in reference.items() if j != k)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"gathered expert-parallel state does not fit {type(fresh).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    return fresh.eval()
