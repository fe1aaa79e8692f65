"""``connito quickstart``: the lifecycle of an MoE model end to end (train, look, adapt with ESFT, opt an expert
out, prune) as a pipeline of ``connito`` jobs, and one ``report.md``; see :mod:`connito.orchestration.quickstart`."""

from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.quickstart import QuickstartConfig


def run(cfg: QuickstartConfig, run_dir: Path) -> None:
    from connito.cli.pipelines import run_pipeline_command
    from connito.orchestration.quickstart import REPORT, plan_quickstart, run_report

    run_pipeline_command("quickstart", cfg, plan_quickstart, {"report": run_report}, f"{REPORT}.md")


COMMAND = Command(
    name="quickstart",
    summary="the lifecycle end to end on the tiny model: train, analyze, ESFT-adapt, opt out, prune; one report.md",
    config_name="quickstart",
    schema=QuickstartConfig,
    run=run,
)
