"""What a Connito checkpoint records besides DeepSpeed's files: ``connito_state.json`` (the loop's position, the
parallel layout that wrote it, the ZeRO-0 optimizer's parameter names) and ``callback_state.pt`` (the state of
the run's callbacks)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "connito_state.json"
CALLBACK_STATE_FILE = "callback_state.pt"


@dataclass
class TrainState:
    """What the loop needs besides DeepSpeed's own state to continue exactly where it stopped."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    """Steps whose update train.nonfinite_loss=skip dropped."""


@dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint was written in."""

    ep_size: int
    world_size: int
    zero_stage: int
    model_type: str

    def describe(self) -> str:
        return f"ep_size {self.ep_size}, world size {self.world_size}, ZeRO stage {self.zero_stage} ({self.model_type})"

    def to_json(self) -> dict:
        return asdict(self)


def read_record(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_layout(checkpoint: Path) -> Layout | None:
    """The layout recorded in a checkpoint; None for checkpoints written before layouts were recorded."""
    saved = read_record(checkpoint).get("layout")
    return Layout(**saved) if saved else None


def recorded_names(checkpoint: Path) -> list[list[str]] | None:
    """The ZeRO-0 optimizer's parameter names, group by group, as the checkpoint recorded them."""
    return read_record(checkpoint).get("optimizer_params")
