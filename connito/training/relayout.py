"""Resuming a checkpoint under another parallel layout (``parallel.ep_size``, world size, ZeRO stage).

Every checkpoint records the layout that wrote it (``connito_state.json`` -> ``layout``: ep_size, world_size,
zero_stage, model_type). On resume, :func:`plan_resume` compares it with the current run's:

* same layout (or a checkpoint written before layouts were recorded): DeepSpeed loads it as it always did;
* a layout DeepSpeed cannot load directly under ZeRO 1/2 (another ``ep_size``, world size or ZeRO stage between
  1 and 2): rank 0 converts the checkpoint once into DeepSpeed's topology-agnostic *universal checkpoint*
  (``deepspeed.checkpoint.ds_to_universal``, AutoEP-aware: it consolidates the per-rank expert shards and their
  ZeRO-1/2 Adam state into whole ``[E, ...]`` tensors) at ``<checkpoint>/universal``, atomically, and every rank
  loads it with ``"checkpoint": {"load_universal": true}``, which slices each rank's experts and ZeRO partition
  back out. Parameters and AdamW state (fp32 master, exp_avg, exp_avg_sq, step) come back identical.

What Connito adds on top of DeepSpeed's converter:

* **Names.** AutoEP layers and the plain transformers blocks name the same tensors differently: AutoEP holds
  ``experts.w1`` (gate) / ``experts.w3`` (up) / ``experts.w2`` (down) [E, I, H] / [E, H, I] and
  ``router.gate.*``; transformers holds ``experts.gate_up_proj`` [E, 2I, H] (gate rows first),
  ``experts.down_proj`` and ``<router_attr>.*`` (plus family names for shared experts). ep_size 1 runs the plain
  blocks, so :func:`add_name_aliases` writes every tensor of the universal folder under both names (elementwise
  optimizer states follow the same concatenation), whichever side wrote it.
* **Optimizer groups.** DeepSpeed restores group by group, zipping the current groups with the checkpoint's and
  copying the checkpoint's group settings by position, and expert groups differ across layouts
  (``name: ep_size_N``, none at ep 1). ``pad_param_groups`` (:mod:`connito.training.optimizer_groups`) gives
  the checkpoint enough groups (else ep 1 -> ep 2 would skip the expert group), and ``restore_groups`` puts the
  current run's group settings back after the load and recomputes each group's learning rate from the restored
  scheduler (what a same-layout resume would have read from the checkpoint).

ZeRO stage 0 on both sides (another ``ep_size``) is re-laid by Connito itself, not by DeepSpeed:
DeepSpeed's universal path needs ZeRO 1/2 (or 3) shards (``ds_to_universal`` reads ``zero_pp_rank_*`` optimizer
files, which a stage-0 run does not write) and a stage-0 engine restores nothing from a universal folder.
:mod:`connito.training.relayout_zero0` reads DeepSpeed's stage-0 files (module state, per-expert files, the torch
AdamW state per expert-parallel rank), maps them through the transformers names with the optimizer parameter
names a ZeRO-0 checkpoint records (``optimizer_params``), writes the current layout's files into
``<checkpoint>/relayout-ep{N}-world{W}/`` and loads them into the engine after ``deepspeed.initialize``
(weights, AdamW state, scheduler, step counters). Same-ep stage-0 checkpoints still resume at another world size
directly (DeepSpeed loads them).

What is refused, before any work, with the fix in the message (:class:`CheckpointLayoutError`):

* moving between ZeRO stage 0 and ZeRO stage 1/2 (plain torch AdamW state on one side, flat ZeRO partitions on
  the other);
* a ZeRO-0 checkpoint at another ep_size that does not record its optimizer's parameter names (written before
  Connito recorded them, or by a bf16 engine, whose optimizer keeps flat groups);
* ZeRO stage 3 conversions (Connito does not run AutoEP under ZeRO-3, and the ZeRO-3 universal path is untested
  here), and a checkpoint of another model family.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from connito.common.atomic import atomic_replace_dir
from connito.experts.autoep_mapping import autoep_names, fuse_experts, hf_name, split_experts
from connito.models.families import MoELayout
from connito.training.collective import convert_once_on_main
from connito.training.deepspeed_internals import (
    UNIVERSAL_STEP_FILE,
    convert_to_universal,
    read_universal_state,
    write_universal_state,
)
from connito.training.run_state import Layout, recorded_names

log = logging.getLogger("connito.training")

UNIVERSAL = "universal"
UNIVERSAL_MARKER = "CONVERTED"
STATES = ("fp32", "exp_avg", "exp_avg_sq")


class CheckpointLayoutError(ValueError):
    """A checkpoint that cannot be resumed under the current layout; the message names the fix."""


def plan_resume(saved: Layout | None, current: Layout, checkpoint: Path | None = None) -> bool:
    """True when the checkpoint must be converted (ZeRO 1/2: a universal checkpoint; ZeRO 0: re-laid by
    :mod:`connito.training.relayout_zero0`); raises when it cannot be resumed. ``checkpoint``: checked for the
    optimizer parameter names a ZeRO-0 re-layout needs."""
    if saved is None or saved == current:
        return False
    if saved.model_type != current.model_type:
        raise CheckpointLayoutError(
            f"the checkpoint holds a '{saved.model_type}' model, this run builds '{current.model_type}'. Resume "
            "with the model config that wrote it, or start a new run (another run.name or train.resume=never)"
        )
    needs = (
        saved.ep_size != current.ep_size
        or saved.zero_stage != current.zero_stage
        or (saved.world_size != current.world_size and current.zero_stage > 0)
    )
    if not needs:  # ZeRO 0, same ep_size: DeepSpeed loads the replicated weights and optimizer directly
        return False
    what = f"checkpoint written at {saved.describe()} cannot be resumed at {current.describe()}"
    if (saved.zero_stage == 0) != (current.zero_stage == 0):
        stage0 = "the checkpoint" if saved.zero_stage == 0 else "this run"
        raise CheckpointLayoutError(
            f"{what}: Connito does not move a checkpoint between ZeRO stage 0 and ZeRO stage 1/2 ({stage0} runs "
            "stage 0, whose optimizer state is the plain torch AdamW state; stage 1/2 keeps flat ZeRO partitions, "
            "and DeepSpeed's universal checkpoints convert only those). Resume at "
            f"engine.zero_stage={saved.zero_stage} (any parallel.ep_size"
            + (")" if saved.zero_stage == 0 else " and world size)")
            + ", or start a new run"
        )
    if saved.zero_stage == 0:
        if checkpoint is not None:
            if recorded_names(checkpoint) is None:
                raise CheckpointLayoutError(
                    f"{what}: the checkpoint does not record its optimizer's parameter names (written before "
                    "Connito did, or by a bf16 engine), which a ZeRO-0 re-layout needs. Resume at "
                    f"parallel.ep_size={saved.ep_size} (any world size that is a multiple of it)"
                )
        return True
    if 3 in (saved.zero_stage, current.zero_stage):
        raise CheckpointLayoutError(
            f"{what}: Connito converts checkpoints between ZeRO stage 1 and 2 layouts only. Resume at "
            f"parallel.ep_size={saved.ep_size} engine.zero_stage={saved.zero_stage} on {saved.world_size} ranks"
        )
    return True


def require_relayable(model, saved: Layout, current: Layout) -> None:
    """A run that trains lean experts (:mod:`connito.experts.lean`, ``callbacks.trainable`` with ``lean=true``) keeps
    the AdamW state of each rank's trainable experts in compact slots shaped by its expert-parallel layout (padded
    to the most any rank holds); Connito re-lays fused expert tensors, not those. Raises the fix."""
    from connito.experts.lean import lean_slots

    if next(lean_slots(model), None) is None:
        return
    raise CheckpointLayoutError(
        f"checkpoint written at {saved.describe()} cannot be resumed at {current.describe()}: this run trains lean "
        "experts (callbacks.trainable.lean=true, the default: each rank's trainable experts and their optimizer "
        "state live in compact slots shaped by the expert-parallel layout), which Connito does not re-lay. Resume "
        f"at parallel.ep_size={saved.ep_size} engine.zero_stage={saved.zero_stage} on {saved.world_size} ranks, or "
        "train with callbacks.trainable.lean=false (gradient masks inside the fused tensors) to change the layout "
        "mid-run"
    )


def prepare_universal(checkpoint: Path, saved: Layout, current: Layout, layout: MoELayout, is_main: bool) -> Path:
    """Collective: rank 0 converts ``checkpoint`` into ``<checkpoint>/universal`` once (atomically); all wait.
    ``layout``: the family's :class:`connito.models.MoELayout`."""
    target = checkpoint / UNIVERSAL
    convert_once_on_main(
        target / UNIVERSAL_MARKER,
        lambda: _convert(checkpoint, target, layout),
        f"converting {checkpoint} ({saved.describe()}) into a universal checkpoint for {current.describe()}",
        is_main,
    )
    if is_main and (target / UNIVERSAL_MARKER).is_file():
        log.info("resuming %s through its universal checkpoint %s", checkpoint, target)
    return target


def _convert(checkpoint: Path, target: Path, layout: MoELayout) -> None:
    with atomic_replace_dir(target, stage_name=f".{UNIVERSAL}.tmp") as tmp:
        convert_to_universal(checkpoint, tmp)
        add_name_aliases(tmp / "zero", layout)
        (tmp / UNIVERSAL_MARKER).write_text("")


# -- AutoEP <-> transformers names in a universal folder ------------------------------------------------------


def _copy_step(sources: list[Path], dest: Path) -> None:
    for source in sources:
        if (source / UNIVERSAL_STEP_FILE).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / UNIVERSAL_STEP_FILE, dest / UNIVERSAL_STEP_FILE)
            return


def _alias(zero: Path, source: str, dest: str) -> None:
    """Same tensor, another name (router, shared experts)."""
    if not (zero / source).is_dir() or (zero / dest).exists():
        return
    for state in STATES:
        tensor = read_universal_state(zero / source, state)
        if tensor is not None:
            write_universal_state(zero / dest, state, tensor)
    _copy_step([zero / source], zero / dest)


def add_name_aliases(zero: Path, layout: MoELayout) -> None:
    """Write every AutoEP tensor of a universal ``zero/`` folder under its transformers name too, and back, with
    the mapping of :mod:`connito.experts.autoep_mapping`.

    A folder holds ``fp32.pt`` (and ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt`` where the optimizer holds
    state; read and written by :mod:`connito.training.deepspeed_internals`); elementwise optimizer states follow the
    same concatenation as the parameters.
    """
    names = {p.name for p in zero.iterdir() if p.is_dir()}

    # AutoEP -> transformers
    for name in sorted(names):
        match = re.fullmatch(r"(.*)\.experts\.w1", name)
        if not match:
            continue
        block = match.group(1)
        sources = {w: zero / f"{block}.experts.{w}" for w in ("w1", "w2", "w3")}
        targets = {p: f"{block}.{layout.experts_attr}.{p}" for p in ("gate_up_proj", "down_proj")}
        if targets["gate_up_proj"] not in names:
            for state in STATES:
                parts = {w: read_universal_state(folder, state) for w, folder in sources.items()}
                if any(part is None for part in parts.values()):
                    continue
                fused = fuse_experts(*(parts[w] for w in ("w1", "w3", "w2")))
                for param, target in targets.items():
                    write_universal_state(zero / target, state, fused[param])
            _copy_step([sources["w1"], sources["w3"]], zero / targets["gate_up_proj"])
            _copy_step([sources["w2"]], zero / targets["down_proj"])
        # AutoEP also exposes its router under the family's name (``<router>.gate.*``), a duplicate without
        # optimizer state: alias from the canonical ``router.*`` tensors only.
        skip = (f"{block}.experts.", f"{block}.{layout.router_attr}.")
        for sub in [n for n in names if n.startswith(f"{block}.") and not n.startswith(skip)]:
            mapped = hf_name(sub[len(block) + 1 :], layout)
            if mapped is not None:
                _alias(zero, sub, f"{block}.{mapped}")

    # transformers -> AutoEP
    for name in sorted(names):
        match = re.fullmatch(rf"(.*)\.{re.escape(layout.experts_attr)}\.gate_up_proj", name)
        if not match or f"{match.group(1)}.experts.w1" in names:
            continue
        block = match.group(1)
        source_up, source_down = zero / name, zero / f"{block}.{layout.experts_attr}.down_proj"
        for state in STATES:
            fused, down = read_universal_state(source_up, state), read_universal_state(source_down, state)
            if fused is None or down is None:
                continue
            for w, tensor in split_experts(fused, down).items():
                write_universal_state(zero / f"{block}.experts.{w}", state, tensor.contiguous(), fused.shape[0])
        for w in ("w1", "w2", "w3"):
            _copy_step([source_up, source_down], zero / f"{block}.experts.{w}")
        experts_prefix = f"{block}.{layout.experts_attr}."
        for sub in [n for n in names if n.startswith(f"{block}.") and not n.startswith(experts_prefix)]:
            for alias in autoep_names(sub[len(block) + 1 :], layout):
                _alias(zero, sub, f"{block}.{alias}")
