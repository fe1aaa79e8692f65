"""Resuming a ZeRO stage 0 checkpoint at another ``parallel.ep_size`` (see :mod:`connito.training.relayout`).

DeepSpeed's universal checkpoints cannot serve ZeRO 0 (no ZeRO optimizer shards to convert, and a stage-0 engine
restores nothing from a universal folder), so Connito re-lays these checkpoints itself, reading DeepSpeed's own
stage-0 files (deepspeed 0.19.8, read through :mod:`connito.training.deepspeed_internals`):

* ``mp_rank_00_model_states.pt``: the non-expert module state (AutoEP names at ep > 1, where the router is stored
  twice, ``router.gate.*`` and its alias ``gate.gate.*``), the LR scheduler, ``global_steps`` / ``global_samples``
  / ``skipped_steps``, the AutoEP layer table (``ds_autoep_layers``: module path, moe layer id, expert placement)
  and, at ep 1, the whole torch optimizer state;
* at ep > 1, ``layer_{L}_expert_{e}_mp_rank_00_model_states.pt``: expert ``e`` (global numbering) of MoE layer
  ``L`` as ``<module_path>.experts.w{1,2,3}.{e}``, and ``expp_rank_{r}_mp_rank_00_optim_states.pt``: the torch
  optimizer state of expert-parallel rank ``r`` (its own expert slices, the replicated rest).

A torch optimizer state dict is positional (parameter ``i`` of the flattened groups), so every fp32 ZeRO-0
checkpoint records the names of its optimizer's parameters, group by group (``connito_state.json`` ->
``optimizer_params``, :func:`optimizer_param_names`). With them, rank 0 of the resuming run builds, once, the
whole model and AdamW state
(exp_avg, exp_avg_sq, step) under the family's transformers names (every expert, global numbering), slices it into
the current layout (AutoEP names and the contiguous expert range of each ep rank, or the plain transformers names
at ep 1) and writes one file per ep rank into ``<checkpoint>/relayout-ep{N}-world{W}/`` (temporary folder, marker
last, atomic rename). Every rank then loads its file into the engine built by ``deepspeed.initialize``: module
weights (``load_state_dict(strict=True)``), the optimizer state re-indexed for the current engine's groups, the
scheduler and the engine's step counters: what DeepSpeed's ``load_checkpoint`` restores in the same layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from connito.common.atomic import atomic_replace_dir
from connito.experts.autoep_mapping import (
    AUTOEP_EXPERT_NAME,
    autoep_slice,
    block_of,
    hf_expert_param,
    hf_name,
    to_hf_state,
)
from connito.models.families import MoELayout
from connito.training.collective import convert_once_on_main
from connito.training.deepspeed_internals import (
    autoep_layer_table,
    engine_state,
    inner_optimizer,
    read_expert_optimizer,
    read_expert_states,
    read_model_states,
    set_engine_counters,
)
from connito.training.optimizer_groups import restore_groups, snapshot_groups
from connito.training.run_state import recorded_names

MARKER = "CONVERTED"
MOMENTS = ("exp_avg", "exp_avg_sq")


def folder_for(checkpoint: Path, ep_size: int, world_size: int) -> Path:
    return checkpoint / f"relayout-ep{ep_size}-world{world_size}"


# -- source: DeepSpeed's ZeRO-0 files -> transformers names ---------------------------------------------------


def _load(path: Path):
    """A file this module wrote (module and optimizer state, the scheduler's state dict)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_source(checkpoint: Path, names: list[list[str]]):
    """Full tensors under the source layout's names: module state, optimizer state, engine state, AutoEP prefixes."""
    model = read_model_states(checkpoint)
    module = dict(model["module"])
    layers = autoep_layer_table(model)
    blocks = []
    for entry in layers:
        prefix, layer_id, count = entry["module_path"], entry["moe_layer_id"], entry["num_experts"]
        placement = entry.get("expert_placement") or {}
        ep = entry["ep_size"]
        for item in placement.get("ranks", []):
            expected = list(range(item["rank"] * count // ep, (item["rank"] + 1) * count // ep))
            if list(item["experts"]) != expected:
                raise RuntimeError(f"{prefix}: expert placement {placement} is not contiguous")
        blocks.append(prefix)
        experts = [read_expert_states(checkpoint, layer_id, e) for e in range(count)]
        for w in ("w1", "w2", "w3"):
            module[f"{prefix}.experts.{w}"] = torch.stack(
                [experts[e][f"{prefix}.experts.{w}.{e}"] for e in range(count)]
            )
    if layers:
        ep_size = layers[0]["ep_size"]
        optimizers = [read_expert_optimizer(checkpoint, r) for r in range(ep_size)]
    else:
        optimizers = [model["optimizer"]]
    per_rank = []
    for optimizer in optimizers:
        groups = optimizer["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g) for g in names]:
            raise RuntimeError(
                f"the optimizer state holds groups of {[len(g['params']) for g in groups]} parameters, "
                f"connito_state.json names {[len(g) for g in names]}"
            )
        by_name = {}
        for group, group_names in zip(groups, names, strict=True):
            for index, name in zip(group["params"], group_names, strict=True):
                if optimizer["state"].get(index):
                    by_name[name] = optimizer["state"][index]
        per_rank.append(by_name)
    optim = {}
    for name, state in per_rank[0].items():
        if AUTOEP_EXPERT_NAME.fullmatch(name) and len(per_rank) > 1:  # expert slices: concatenate in ep-rank order
            optim[name] = {k: torch.cat([r[name][k] for r in per_rank]) for k in MOMENTS}
            optim[name]["step"] = state["step"]
        else:
            optim[name] = state
    return module, optim, engine_state(model), blocks


def _to_hf(tensors: dict, blocks: list[str], layout: MoELayout, hf_names: set[str]) -> dict:
    """AutoEP names (whole [E, ...] experts) -> the family's transformers names; plain names pass through."""
    return {k: v for k, v in to_hf_state(tensors, blocks, layout).items() if k in hf_names}


def _step_name(name: str, blocks: list[str], layout: MoELayout) -> str:
    """The transformers parameter a target or source parameter belongs to, experts included."""
    match = AUTOEP_EXPERT_NAME.fullmatch(name)
    if match and match.group(1) in blocks:
        return f"{match.group(1)}.{layout.experts_attr}.{hf_expert_param(match.group(2))}"
    where = block_of(name, blocks)
    mapped = None if where is None else hf_name(where[1], layout)
    return name if mapped is None else f"{where[0]}.{mapped}"


def _target_blocks(engine) -> tuple[list[str], int, int]:
    from connito.parallel.expert_parallel import autoep_layers

    layers = autoep_layers(engine.module)
    if not layers:
        return [], 0, 1
    first = next(iter(layers.values()))
    return list(layers), first.ep_rank, dist.get_world_size(group=first.ep_group)


def _convert(checkpoint: Path, target: Path, engine, hf_names: set[str], layout: MoELayout) -> None:
    names = recorded_names(checkpoint)
    module, optim, counters, source_blocks = _read_source(checkpoint, names)
    hf_params = _to_hf(module, source_blocks, layout, hf_names)
    missing = sorted(hf_names - set(hf_params))
    if missing:
        raise RuntimeError(f"the checkpoint lacks {missing[:8]}")
    hf_moments = {k: _to_hf({n: s[k] for n, s in optim.items()}, source_blocks, layout, hf_names) for k in MOMENTS}
    hf_steps = {}  # AdamW keeps one step per parameter; a fused tensor takes its first source's
    for name, saved in optim.items():
        hf_steps.setdefault(_step_name(name, source_blocks, layout), saved["step"])

    blocks, _, ep_size = _target_blocks(engine)
    target_shapes = {k: tuple(v.shape) for k, v in engine.module.state_dict().items()}
    param_names = [n for n, _ in engine.module.named_parameters()]
    with atomic_replace_dir(target, stage_name=f".{target.name}.tmp") as tmp:
        for ep_rank in range(ep_size):
            state = {}
            for name, shape in target_shapes.items():
                tensor = autoep_slice(hf_params, name, blocks, layout, shape[0], ep_rank)
                if tensor is None or tuple(tensor.shape) != shape:
                    raise RuntimeError(f"cannot rebuild {name} {shape} from the checkpoint")
                state[name] = tensor
            optimizer = {}
            for name in param_names:
                local = target_shapes[name][0]
                moments = {k: autoep_slice(hf_moments[k], name, blocks, layout, local, ep_rank) for k in MOMENTS}
                hf = _step_name(name, blocks, layout)
                if any(m is None for m in moments.values()) or hf not in hf_steps:
                    continue  # no AdamW state yet (never stepped)
                optimizer[name] = {"step": hf_steps[hf].clone(), **moments}
            torch.save({"module": state, "optimizer": optimizer}, tmp / f"ep_rank_{ep_rank}.pt")
        torch.save(counters, tmp / "engine_state.pt")
        (tmp / MARKER).write_text("")


def load(engine, checkpoint: Path, target: Path, hf_names: set[str], layout: MoELayout, is_main: bool) -> None:
    """Collective: rank 0 re-lays ``checkpoint`` into ``target`` once (atomically); every rank loads its part.
    ``hf_names``: the state-dict names of this run's plain transformers model (before AutoEP)."""
    convert_once_on_main(
        target / MARKER,
        lambda: _convert(checkpoint, target, engine, hf_names, layout),
        f"re-laying the ZeRO-0 checkpoint {checkpoint} into {target}",
        is_main,
    )

    _, ep_rank, _ = _target_blocks(engine)
    payload = _load(target / f"ep_rank_{ep_rank}.pt")
    engine.module.load_state_dict(payload["module"], strict=True)
    groups = snapshot_groups(engine)
    optimizer = inner_optimizer(engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    state, param_groups, index = {}, [], 0
    for group in optimizer.param_groups:
        ids = []
        for param in group["params"]:
            saved = payload["optimizer"].get(names[id(param)])
            if saved is not None:
                state[index] = saved
            ids.append(index)
            index += 1
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    saved = _load(target / "engine_state.pt")
    if engine.lr_scheduler is not None and saved["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    restore_groups(engine, groups)
    set_engine_counters(engine, saved)
