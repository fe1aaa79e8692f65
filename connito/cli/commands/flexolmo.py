"""``connito flexolmo``: FlexOLMo as independent jobs (local processes, torchrun, or SLURM arrays): a public model,
one expert per data owner trained alone against it, the merge, a report; then opt owners out or remove their
experts; see :mod:`connito.orchestration.flexolmo`."""

import sys
from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.flexolmo import FlexOlmoConfig


def run(cfg: FlexOlmoConfig, run_dir: Path) -> None:
    # here, not at the top: `connito --help` stays fast
    from connito.orchestration import OrchestrationError, run_pipeline, status_table
    from connito.orchestration.flexolmo import (
        REPORT,
        STAGES,
        plan_flexolmo,
        run_evaluate,
        run_merge,
        run_prepare,
        run_remove,
        run_report,
    )
    from connito.orchestration.recipe import run_root

    root = run_root(cfg.run)
    try:
        if cfg.stage == "prepare":
            if not cfg.owner_name:
                raise ValueError("stage=prepare writes one owner's start: give owner_name=<owner>")
            print(f"owner start: {run_prepare(root, cfg.owner_name)}")
            return
        if cfg.stage == "merge":
            print(f"merged:     {run_merge(root)}")
            return
        if cfg.stage == "report":
            run_report(root)
            print(f"report:     {root / f'{REPORT}.md'}")
            return
        if cfg.stage == "evaluate":
            run_evaluate(root, list(cfg.opt_out))
            return
        if cfg.stage == "remove":
            print(f"written:    {run_remove(root, list(cfg.opt_out), cfg.out)}")
            return
        if cfg.stage:
            raise ValueError(
                f"stage={cfg.stage!r}: choose one of {', '.join(STAGES)} (evaluate and remove run on a finished "
                "pipeline; empty: the pipeline)"
            )
        plan = plan_flexolmo(cfg)
        run_pipeline(root, plan, cfg.launcher, cfg.rerun, run_name=cfg.run.name)
    except (OrchestrationError, ValueError) as err:
        print(f"connito flexolmo: {err}", file=sys.stderr)
        sys.exit(1)
    print(status_table(root, plan))
    if (root / f"{REPORT}.md").is_file():
        print((root / f"{REPORT}.md").read_text())
        print(f"report:     {root / f'{REPORT}.md'}")


COMMAND = Command(
    name="flexolmo",
    summary="FlexOLMo: data owners train experts apart against a public model (as jobs), merged; opt any owner out",
    config_name="flexolmo",
    schema=FlexOlmoConfig,
    run=run,
)
