"""Training checkpoints with a crash-safe ``latest`` pointer.

Layout under ``<run_dir>/checkpoints``::

    step_000250/            DeepSpeed's files (model, optimizer, scheduler, per rank) + connito_state.json
    step_000250/COMPLETE    written by rank 0 after every rank finished writing
    latest                  the tag of the newest COMPLETE checkpoint, replaced atomically

A kill at any moment leaves ``latest`` naming a complete checkpoint (or absent): the marker is written only
after a barrier that every rank reaches once its files are on disk, and ``latest`` is swapped in with
``os.replace`` after the marker exists.
"""

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("connito.training")

MARKER = "COMPLETE"
LATEST = "latest"
STATE_FILE = "connito_state.json"


@dataclass
class TrainState:
    """What the loop needs besides DeepSpeed's own state to continue exactly where it stopped."""

    step: int = 0
    tokens_seen: int = 0


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file() and (checkpoint / STATE_FILE).is_file()


def save(engine, checkpoint_root: Path, state: TrainState, is_main: bool, keep: int) -> Path:
    """Collective: every rank must call it."""
    tag = tag_for(state.step)
    target = checkpoint_root / tag
    if is_main:
        if target.exists():  # a leftover from a run killed while writing this very step
            shutil.rmtree(target)
        checkpoint_root.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(checkpoint_root), tag=tag, save_latest=False)
    if is_main:
        _write_atomic(target / STATE_FILE, json.dumps(asdict(state)))
    _barrier()  # every rank's shards are on disk
    if is_main:
        _write_atomic(target / MARKER, "")
        _write_atomic(checkpoint_root / LATEST, tag)
        _prune(checkpoint_root, keep, protect=tag)
    _barrier()
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


def load(engine, checkpoint: Path) -> TrainState:
    """Collective: restore model, optimizer and scheduler state, and return the loop's state."""
    if not is_complete(checkpoint):
        raise FileNotFoundError(
            f"{checkpoint} is not a complete Connito checkpoint (no {MARKER} marker or {STATE_FILE}). "
            "Point train.resume at a step_* directory that has both, or use train.resume=auto"
        )
    load_path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
    return TrainState(**json.loads((checkpoint / STATE_FILE).read_text()))
