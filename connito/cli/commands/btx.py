"""``connito btx``: branch-train-mix as independent jobs (local processes, torchrun, or a SLURM array), then
merge, router fine-tuning and a per-domain report; see :mod:`connito.orchestration.btx`."""

import sys
from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.btx import BtxConfig


def run(cfg: BtxConfig, run_dir: Path) -> None:
    # here, not at the top: `connito --help` stays fast
    from connito.orchestration import OrchestrationError, run_pipeline, status_table
    from connito.orchestration.btx import plan_btx, run_merge, run_report
    from connito.orchestration.plan import write_plan
    from connito.orchestration.recipe import run_root

    root = run_root(cfg.run)
    try:
        if cfg.stage == "merge":
            print(f"merged:     {run_merge(root)}")
            return
        if cfg.stage == "report":
            run_report(root)
            print(f"report:     {root / 'btx_report.md'}")
            return
        if cfg.stage not in ("", "plan"):
            raise ValueError(f"stage={cfg.stage!r}: plan, merge or report (empty: the whole pipeline)")
        plan = plan_btx(cfg)
        if cfg.stage == "plan":
            write_plan(root, plan, replace=cfg.rerun == "all")
        else:
            run_pipeline(root, plan, cfg.launcher, cfg.rerun, run_name=cfg.run.name)
    except (OrchestrationError, ValueError) as err:
        print(f"connito btx: {err}", file=sys.stderr)
        sys.exit(1)
    print(status_table(root, plan))
    if (root / "btx_report.md").is_file():
        print((root / "btx_report.md").read_text())
        print(f"report:     {root / 'btx_report.md'}")


COMMAND = Command(
    name="btx",
    summary="branch-train-mix: one dense branch per domain as parallel jobs (local/torchrun/SLURM), merged to an MoE",
    config_name="btx",
    schema=BtxConfig,
    run=run,
)
