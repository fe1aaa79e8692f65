"""``connito flexolmo``: FlexOLMo as independent jobs (local processes, torchrun, or SLURM arrays): a public model,
one expert per data owner trained alone against it, the merge, a report; then opt owners out or remove their
experts; see :mod:`connito.orchestration.flexolmo`."""

from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.flexolmo import FlexOlmoConfig


def run(cfg: FlexOlmoConfig, run_dir: Path) -> None:
    from connito.cli.pipelines import run_pipeline_command
    from connito.orchestration.flexolmo import (
        REPORT,
        plan_flexolmo,
        run_evaluate,
        run_merge,
        run_prepare,
        run_remove,
        run_report,
    )

    def prepare(root: Path) -> None:
        if not cfg.owner_name:
            raise ValueError("stage=prepare writes one owner's start: give owner_name=<owner>")
        print(f"owner start: {run_prepare(root, cfg.owner_name)}")

    def report(root: Path) -> None:
        run_report(root)
        print(f"report:     {root / f'{REPORT}.md'}")

    stages = {
        "prepare": prepare,
        "merge": lambda root: print(f"merged:     {run_merge(root)}"),
        "report": report,
        "evaluate": lambda root: run_evaluate(root, list(cfg.opt_out)),
        "remove": lambda root: print(f"written:    {run_remove(root, list(cfg.opt_out), cfg.out)}"),
    }
    run_pipeline_command("flexolmo", cfg, plan_flexolmo, stages, f"{REPORT}.md")


COMMAND = Command(
    name="flexolmo",
    summary="FlexOLMo: data owners train experts apart against a public model (as jobs), merged; opt any owner out",
    config_name="flexolmo",
    schema=FlexOlmoConfig,
    run=run,
)
