"""Where metrics go: ``metrics.jsonl`` in the run directory and, when enabled, wandb (rank 0 only)."""

import json
import logging
import netrc
import os
import uuid
from pathlib import Path

log = logging.getLogger("connito.training")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class MetricsSink:
    def __init__(self, run_dir: Path, enabled: bool, use_wandb: bool, project: str, run_name: str, config: dict):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._wandb_run = None
        if not enabled:
            return
        if use_wandb:
            self._wandb_run = self._start_wandb(run_dir, project, run_name, config)

    @staticmethod
    def _start_wandb(run_dir: Path, project: str, run_name: str, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        run = wandb.init(
            project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode
        )
        log.info("wandb: %s mode%s", mode, " (sync later with `wandb sync`)" if mode == "offline" else "")
        return run

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, which the resumed run will redo."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
