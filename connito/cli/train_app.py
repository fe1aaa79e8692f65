"""``connito train``: the Hydra app around :func:`connito.training.trainer.run_training`."""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from connito.cli import schema  # noqa: F401  (registers the typed configs)
from connito.cli.logs import quiet_libraries
from connito.cli.paths import config_dir

log = logging.getLogger("connito")


def to_typed(cfg: DictConfig):
    """DictConfig stays in the CLI layer: everything below receives the typed dataclasses."""
    return OmegaConf.to_object(cfg)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def train_app(cfg: DictConfig) -> float | None:
    quiet_libraries()
    from connito.training.trainer import run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = run_training(to_typed(cfg), run_dir)
    if not result.finished:
        log.info("stopped at step %d; run the same command again to resume", result.steps_done)
        return None
    return result.validation.get("all")  # the value Hydra sweepers optimise
