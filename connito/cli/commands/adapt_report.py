"""``connito adapt report``: the table of finished ``connito adapt`` runs."""

from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command


@dataclass
class AdaptReportConfig:
    """Root config of ``connito adapt report``."""

    runs: list[str] = field(default_factory=list)
    """Run directories of ``connito adapt`` (or their adapt.json files), one table row each, in this order."""


def run(cfg: AdaptReportConfig, run_dir: Path) -> None:
    from connito.adaptation.outcome import outcome_table, read_outcomes

    if not cfg.runs:
        raise ValueError("name the runs: connito adapt report runs='[runs/adapt-full,runs/adapt-esft]'")
    print(outcome_table(read_outcomes(cfg.runs)))


COMMAND = Command(
    name="adapt report",
    summary="the table of finished `connito adapt` runs: gain, forgetting, trainable parameters, cost",
    config_name="adapt_report",
    schema=AdaptReportConfig,
    run=run,
)
