"""``connito groups``: expert-group jobs (local processes, torchrun, or SLURM arrays): a base MoE's experts split
into disjoint groups, one per domain, each trained by its own job, merged back onto the base after a held-out
acceptance test, and a report; see :mod:`connito.orchestration.groups`."""

from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.groups import GroupsConfig


def run(cfg: GroupsConfig, run_dir: Path) -> None:
    from connito.cli.pipelines import run_pipeline_command
    from connito.orchestration.groups import (
        REPORT,
        failed_merge_message,
        plan_groups,
        run_merge,
        run_partition,
        run_report,
    )

    def partition(root: Path) -> None:
        run_partition(root)
        print(f"groups:     {root / 'groups'}")

    def report(root: Path) -> None:
        run_report(root)
        print(f"report:     {root / f'{REPORT}.md'}")

    def explain(root: Path, plan) -> str:
        refusal = failed_merge_message(root, plan)
        if not refusal:
            return ""
        return (
            f"the merge job's error:\n{refusal}\n\nTo merge these groups under other merge.* options (e.g. "
            "merge.max_regression), run the same command with them: only the merge and the report run again"
        )

    stages = {"partition": partition, "merge": lambda root: print(f"merged:     {run_merge(root)}"), "report": report}
    run_pipeline_command("groups", cfg, plan_groups, stages, f"{REPORT}.md", explain)


COMMAND = Command(
    name="groups",
    summary="expert groups: disjoint experts of one MoE trained per domain as jobs, merged back if no domain worsens",
    config_name="groups",
    schema=GroupsConfig,
    run=run,
)
