"""What the composition commands (``connito btx``, ``connito flexolmo``, ``connito groups``) share: plan and run
their pipeline, or run one of its stages in this process (what a merge or report job runs), print where the
pipeline stands, and turn the errors a user can fix into one message and exit code 1."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def run_pipeline_command(
    kind: str,
    cfg: Any,
    plan: Callable[[Any], Any],
    stages: Mapping[str, Callable[[Path], None]],
    report: str,
    explain: Callable[[Path, Any], str] | None = None,
) -> None:
    """``cfg.stage`` empty: plan and run the pipeline; ``plan``: write the plan and run nothing; a name in
    ``stages``: run that stage on the pipeline in ``<run.root>/<run.name>``. ``report``: the file the pipeline's
    report stage writes there (printed at the end when present). ``explain(root, plan)``: more to print after an
    error (e.g. the refusal a failed job wrote into its log)."""
    # here, not at the top: `connito --help` stays fast
    from connito.orchestration import OrchestrationError, run_pipeline, status_table
    from connito.orchestration.plan import write_plan
    from connito.orchestration.recipe import run_root

    root = run_root(cfg.run)
    planned = None
    try:
        if cfg.stage in stages:
            stages[cfg.stage](root)
            return
        if cfg.stage not in ("", "plan"):
            raise ValueError(f"stage={cfg.stage!r}: choose plan or one of {', '.join(stages)} (empty: the pipeline)")
        planned = plan(cfg)
        if cfg.stage == "plan":
            write_plan(root, planned, replace=cfg.rerun == "all")
        else:
            run_pipeline(root, planned, cfg.launcher, cfg.rerun, run_name=cfg.run.name)
    except (OrchestrationError, ValueError) as err:
        print(f"connito {kind}: {err}", file=sys.stderr)
        more = explain(root, planned) if explain is not None and planned is not None else ""
        if more:
            print(f"\n{more}", file=sys.stderr)
        sys.exit(1)
    print(status_table(root, planned))
    if (root / report).is_file():
        print((root / report).read_text())
        print(f"report:     {root / report}")
