"""Training checkpoints with a crash-safe ``latest`` pointer.

Layout under ``<run_dir>/checkpoints``::

    step_000250/            DeepSpeed's files (model, optimizer, scheduler, per rank) + connito_state.json
                            (the loop's state and the parallel layout that wrote it)
    step_000250/COMPLETE    written by rank 0 after every rank finished writing
    step_000250/universal/  only after a resume under another layout (ZeRO 1/2): DeepSpeed's universal checkpoint
                            (see :mod:`connito.training.relayout`)
    step_000250/relayout-ep2-world4/  only after a ZeRO-0 resume at another ep_size: the checkpoint re-laid for
                            that layout (see :mod:`connito.training.relayout_zero0`)
    latest                  the tag of the newest COMPLETE checkpoint, replaced atomically

DeepSpeed's own files are read only through :mod:`connito.training.deepspeed_internals`.

A kill at any moment leaves ``latest`` naming a complete checkpoint (or absent): the marker is written only
after a barrier that every rank reaches once its files are on disk, and ``latest`` is swapped in with
``os.replace`` after the marker exists.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist

from connito.common.atomic import atomic_write_text
from connito.training.collective import barrier
from connito.training.deepspeed_internals import MODEL_STATES_FILE, read_model_states, restore_frozen_expert_shards
from connito.training.optimizer_groups import optimizer_param_names, pad_param_groups, restore_groups, snapshot_groups
from connito.training.run_state import CALLBACK_STATE_FILE, STATE_FILE, TrainState

log = logging.getLogger("connito.training")

MARKER = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


_write_atomic = atomic_write_text


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file() and (checkpoint / STATE_FILE).is_file()


def save(
    engine,
    checkpoint_root: Path,
    state: TrainState,
    is_main: bool,
    keep: int,
    layout: dict | None = None,
    callback_state: dict | None = None,
) -> Path:
    """Collective: every rank must call it. ``layout`` (ep_size, world_size, zero_stage, model_type) is recorded
    in ``connito_state.json`` so a resume under another layout knows what to convert; ``callback_state`` (the
    run's callbacks' ``state_dict()``s by name, rank 0's) goes to ``callback_state.pt``, written before the
    ``COMPLETE`` marker like everything else."""
    tag = tag_for(state.step)
    target = checkpoint_root / tag
    if is_main:
        if target.exists():  # a leftover from a run killed while writing this very step
            shutil.rmtree(target)
        checkpoint_root.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(checkpoint_root), tag=tag, save_latest=False)
    if is_main:
        record = asdict(state) if layout is None else {**asdict(state), "layout": layout}
        names = optimizer_param_names(engine)
        if names is not None:  # ZeRO 0: lets a resume at another ep_size re-lay the positional optimizer state
            record["optimizer_params"] = names
        _write_atomic(target / STATE_FILE, json.dumps(record))
        if callback_state:
            torch.save(callback_state, target / CALLBACK_STATE_FILE)
    barrier()  # every rank's shards are on disk
    if is_main:
        _write_atomic(target / MARKER, "")
        _write_atomic(checkpoint_root / LATEST, tag)
        _prune(checkpoint_root, keep, protect=tag)
    barrier()
    return target


def _prune(checkpoint_root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in checkpoint_root.glob("step_*") if is_complete(p))
    for old in complete[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def find_latest(checkpoint_root: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one, else None."""
    pointer = checkpoint_root / LATEST
    if pointer.is_file():
        candidate = checkpoint_root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
        log.warning("%s names %s, which is incomplete; looking for an older checkpoint", pointer, candidate)
    complete = sorted(p for p in checkpoint_root.glob("step_*") if is_complete(p))
    return complete[-1] if complete else None


class CheckpointDirNotShared(RuntimeError):
    """The ranks do not see the same checkpoint directory (run.root is not on storage every node shares)."""


def _latest_tag(checkpoint_root: Path) -> str:
    pointer = checkpoint_root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else "none"


def require_shared(checkpoint_root: Path, resume_from: Path | None = None) -> None:
    """Collective (a no-op in one process): refuse to go on unless every rank sees the same checkpoint directory.

    Rank 0 writes a probe file with a fresh name into ``checkpoint_root``; every rank reports whether it sees it,
    the ``latest`` it reads and the checkpoint it would resume from, and the ranks gather the reports. Raised on
    every rank, naming what each rank saw."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    probe_name = [f".shared-probe-{os.urandom(8).hex()}" if rank == 0 else ""]
    dist.broadcast_object_list(probe_name, src=0)
    probe = checkpoint_root / probe_name[0]
    if rank == 0:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        _write_atomic(probe, "")
    barrier()
    mine = (probe.is_file(), _latest_tag(checkpoint_root), resume_from.name if resume_from else "none")
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    if len(set(seen)) == 1:
        return
    report = "; ".join(
        f"rank {r}: {'sees' if sees else 'does not see'} rank 0's probe file, latest={latest}, resume from {resume}"
        for r, (sees, latest, resume) in enumerate(seen)
    )
    raise CheckpointDirNotShared(
        f"the ranks do not see the same checkpoint directory {checkpoint_root} ({report}). Every node must read "
        "and write the same run directory: put run.root on a filesystem every node shares (NFS, Lustre, a "
        "cluster mount), e.g. run.root=/shared/connito-runs, and resume from there"
    )


def require_complete(checkpoint: Path) -> None:
    if not is_complete(checkpoint):
        raise FileNotFoundError(
            f"{checkpoint} is not a complete Connito checkpoint (no {MARKER} marker or {STATE_FILE}). "
            "Point train.resume at a step_* directory that has both, or use train.resume=auto"
        )


def load(engine, checkpoint: Path, universal: Path | None = None, relaid=None) -> TrainState:
    """Collective: restore model, optimizer and scheduler state, and return the loop's state.

    ``universal``: the checkpoint's universal conversion (:func:`connito.training.relayout.prepare_universal`),
    loaded instead of DeepSpeed's own files; the engine must run with ``"checkpoint": {"load_universal": true}``.
    ``relaid``: a ZeRO-0 checkpoint at another ep_size; ``relaid(engine)`` restores it instead of DeepSpeed
    (:func:`connito.training.relayout_zero0.load`).
    """
    require_complete(checkpoint)
    if relaid is not None:
        relaid(engine)
        load_path = str(checkpoint)
        restore_choice_biases(engine, checkpoint)
    elif universal is None:
        load_path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        restore_frozen_expert_shards(engine, checkpoint)
    else:
        groups = snapshot_groups(engine)
        pad_param_groups(universal, len(groups), not dist.is_initialized() or dist.get_rank() == 0)
        load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
        restore_groups(engine, groups)
        restore_choice_biases(engine, checkpoint)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
    record = json.loads((checkpoint / STATE_FILE).read_text())
    return TrainState(**{f.name: record[f.name] for f in fields(TrainState) if f.name in record})


def restore_choice_biases(engine, checkpoint: Path) -> None:
    """Put back each router's choice bias (DeepSeek-V3's ``e_score_correction_bias``, a buffer the aux-loss-free
    bias update trains) after a load under another layout. The universal load and Connito's ZeRO-0 re-layout
    restore tensors by name, and the buffer is named after the layout (transformers ``<block>.gate.``, AutoEP
    ``<block>.router.``): take it from the checkpoint's module state by decoder layer instead."""
    if not (checkpoint / MODEL_STATES_FILE).is_file():
        return
    module = read_model_states(checkpoint, mmap=True)["module"]  # mmap: only the bias storages are read
    saved = {}
    for key, value in module.items():
        match = re.fullmatch(r".*layers\.(\d+)\..*\.e_score_correction_bias", key)
        if match:
            saved[int(match.group(1))] = value
    if not saved:
        return
    from connito.experts import ExpertView

    for layer, block in ExpertView(engine.module).blocks():
        bias = block.choice_bias()
        if bias is not None and layer in saved:
            with torch.no_grad():
                bias.copy_(saved[layer].to(bias.device, bias.dtype))


def load_callback_state(checkpoint: Path) -> dict:
    """The callbacks' states saved with ``checkpoint`` (tensors, numbers, strings and containers of them only:
    loaded with ``weights_only=True``, nothing else is unpickled); empty when it saved none."""
    path = checkpoint / CALLBACK_STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
