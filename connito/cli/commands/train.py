"""``connito train``: the Hydra app around :func:`connito.training.trainer.run_training`, and the analysis report
of the trained model (``analysis=report``, on by default; ``analysis=none`` turns it off)."""

import logging
from dataclasses import dataclass
from pathlib import Path

from connito.analysis.config import AnalysisOptions
from connito.cli.command import Command
from connito.training.config import ConnitoConfig

log = logging.getLogger("connito")


@dataclass
class TrainCommandConfig(ConnitoConfig):
    """Root config of ``connito train``: the trainer's config plus what the command does after training."""

    analysis: AnalysisOptions | None = None
    """``analysis=report`` (the default in configs/train.yaml): once training finished, rank 0 runs ``connito
    analyze`` on the HF export with the run's data and writes ``<run>/analysis/`` (analysis.json, report.md,
    pictures); options as in ``connito analyze`` (``analysis.drivers.enabled=false`` ...). ``analysis=none``: no
    report. Needs ``train.export=true``."""


def run(cfg: TrainCommandConfig, run_dir: Path) -> float | None:
    from connito.training.trainer import run_training  # here, not at the top: `connito --help` stays fast

    result = run_training(cfg, run_dir)
    if not result.finished:  # the trainer said where it stopped and how to resume
        return None
    if cfg.analysis is not None and result.trainer.info.is_main:
        if result.export_dir is None:
            log.warning("no analysis report: it reads the HF export and train.export=false ")
        else:
            from connito.analysis.run import analyze_run

            analysis = analyze_run(cfg.analysis, result.run_dir, result.trainer.cfg.data)  # the data the run read
            print(f"analysis:   {analysis.out_dir / 'report.md'}")
    return result.validation.get("all")  # the value Hydra sweepers optimise


COMMAND = Command(
    name="train",
    summary="train a MoE model with DeepSpeed (no arguments: the tiny quickstart on the bundled data)",
    config_name="train",
    schema=TrainCommandConfig,
    run=run,
)
