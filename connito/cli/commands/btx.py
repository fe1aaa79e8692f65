"""``connito btx``: branch-train-mix as independent jobs (local processes, torchrun, or a SLURM array), then
merge, fine-tuning and a per-domain report; see :mod:`connito.orchestration.btx`."""

from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.btx import BtxConfig


def run(cfg: BtxConfig, run_dir: Path) -> None:
    from connito.cli.pipelines import run_pipeline_command
    from connito.orchestration.btx import plan_btx, run_merge, run_report

    def report(root: Path) -> None:
        run_report(root)
        print(f"report:     {root / 'btx_report.md'}")

    stages = {"merge": lambda root: print(f"merged:     {run_merge(root)}"), "report": report}
    run_pipeline_command("btx", cfg, plan_btx, stages, "btx_report.md")


COMMAND = Command(
    name="btx",
    summary="branch-train-mix: one dense branch per domain as parallel jobs, mixed by BTX, BAM or BTS (mix.method)",
    config_name="btx",
    schema=BtxConfig,
    run=run,
)
