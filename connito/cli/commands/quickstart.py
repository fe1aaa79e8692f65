"""``connito quickstart``: the lifecycle of an MoE model end to end (train, look, adapt with ESFT, opt an expert
out, prune) as a pipeline of ``connito`` jobs, and one ``report.md``; see :mod:`connito.orchestration.lifecycle`."""

from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.lifecycle import LifecycleConfig


def run(cfg: LifecycleConfig, run_dir: Path) -> None:
    from connito.cli.pipelines import run_pipeline_command
    from connito.orchestration.lifecycle import REPORT, plan_lifecycle, run_report

    run_pipeline_command("quickstart", cfg, plan_lifecycle, {"report": run_report}, f"{REPORT}.md")


COMMAND = Command(
    name="quickstart",
    summary="the lifecycle end to end on the tiny model: train, analyze, ESFT-adapt, opt out, prune; one report.md",
    config_name="quickstart",
    schema=LifecycleConfig,
    run=run,
)
