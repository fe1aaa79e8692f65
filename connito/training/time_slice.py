"""Time slices: a run that stops itself before its job's time limit, with a checkpoint, to be resumed later.

``train.stop_after_time`` (e.g. ``3h50m``) bounds one invocation's wall time, counted from when the trainer starts
(before data, model and engine are built). After each step the run stops if the next step would not fit, judged by
the mean step time so far; every rank takes the same decision (rank 0's clock, one broadcast per step), so all ranks
checkpoint the same step. The SLURM template (``launch/slurm.sbatch``) sets it from the job's time left and
requeues the job while the run is unfinished; ``<run>/status.json`` says how the invocation ended.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from connito.common.atomic import atomic_write_text

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
STATUS_FILE_ENV = "CONNITO_STATUS_FILE"
"""A launcher's copy of ``<run>/status.json`` (the SLURM template reads it to decide whether to requeue)."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``45m``, ``3h50m``, ``1d2h``, ``1.5h``; ``""`` or ``0`` is 0 (no limit)."""
    compact = str(text).strip().lower().replace(" ", "")
    if compact in ("", "0"):
        return 0.0
    try:
        seconds = float(compact)
    except ValueError:
        parts = _DURATION.findall(compact)
        if not parts or "".join(number + unit for number, unit in parts) != compact:
            seconds = -1.0
        else:
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds < 0:
        raise ValueError(
            f"train.stop_after_time='{text}' is not a duration: write seconds (5400) or numbers with units d, h, "
            "m, s (3h50m, 45m, 90s); empty or 0 means no limit"
        )
    return seconds


class TimeSlice:
    """Decides, after each step, whether the next one still fits in ``limit_s`` seconds of wall time."""

    def __init__(self, limit_s: float, started_at: float | None = None):
        self.limit_s = limit_s
        self.started_at = time.monotonic() if started_at is None else started_at
        self.loop_started_at: float | None = None
        self.steps = 0

    def start_loop(self) -> None:
        self.loop_started_at, self.steps = time.monotonic(), 0

    def over(self, world_size: int, device: torch.device) -> bool:
        """Collective when ``world_size > 1``: True on every rank when rank 0 sees no room for another step."""
        self.steps += 1
        now = time.monotonic()
        mean_step = (now - (self.loop_started_at or self.started_at)) / self.steps
        stop = now - self.started_at + mean_step > self.limit_s
        if world_size > 1:
            flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop


def write_status(run_dir: Path, status: dict) -> None:
    """``<run>/status.json`` (and the launcher's copy at ``$CONNITO_STATUS_FILE``), written atomically."""
    text = json.dumps(status, indent=2) + "\n"
    targets = [run_dir / "status.json"]
    if os.environ.get(STATUS_FILE_ENV):
        targets.append(Path(os.environ[STATUS_FILE_ENV]))
    for target in targets:
        atomic_write_text(target, text)
