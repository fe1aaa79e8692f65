"""``connito train``: the Hydra app around :func:`connito.training.trainer.run_training`."""

import logging
from pathlib import Path

from connito.cli.command import Command
from connito.training.config import ConnitoConfig

log = logging.getLogger("connito")


def run(cfg: ConnitoConfig, run_dir: Path) -> float | None:
    from connito.training.trainer import run_training  # here, not at the top: `connito --help` stays fast

    result = run_training(cfg, run_dir)
    if not result.finished:
        log.info("stopped at step %d; run the same command again to resume", result.steps_done)
        return None
    return result.validation.get("all")  # the value Hydra sweepers optimise


COMMAND = Command(
    name="train",
    summary="train a MoE model with DeepSpeed (no arguments: the tiny quickstart on the bundled data)",
    config_name="train",
    schema=ConnitoConfig,
    run=run,
)
