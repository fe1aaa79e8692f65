"""Run a planned pipeline to its end, or as far as it gets, and say where it stands.

:func:`run_pipeline` is what every composition command calls after planning:

1. refuse, before anything is written, while a job of the pipeline is still running or queued (a second copy
   would write into the same directory); the error shows where every job stands;
2. write the plan, or check it against the one on disk (:mod:`connito.orchestration.plan`): other pipeline-wide
   settings are refused; a stage whose jobs or own settings changed is reset to ``pending`` with every stage
   after it, their work directories deleted; ``rerun=all`` resets every job;
3. find the first stage with a job that is not done; every job of the stages after it is reset to ``pending``
   and its work directory deleted (a merge built on an older branch is not kept, a fine-tuning of an older merge
   does not resume);
4. local/torchrun: run that stage's unfinished jobs, then the next stage, ...; a stage with a failed or lost job
   stops the pipeline -- the finished jobs stay done, nothing of a later stage starts (a merge never sees an
   incomplete set), and the error names each failed job with its reason and log. Running the same command again
   reruns only those jobs.
   slurm: submit every remaining stage at once as arrays chained by ``afterok``, then (``launcher.wait``) poll the
   state files until the last stage ends or a job fails.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from connito.orchestration.config import LauncherConfig, check_launcher
from connito.orchestration.jobs import FINISHED, Job, OrchestrationError, PipelineStopped, current_status, reset_state
from connito.orchestration.launchers import run_local, submit_slurm
from connito.orchestration.plan import PLAN_FILE, Plan, read_plan, write_plan

log = logging.getLogger("connito.orchestration")


def status_table(root: Path, plan: Plan) -> str:
    rows = ["| stage | job | status | attempt | detail |", "|---|---|---|---|---|"]
    for stage in plan.stages:
        for job in stage.jobs:
            status, state = current_status(root, job)
            detail = state.reason or (f"SLURM {state.slurm_job}" if state.slurm_job and status != "done" else "")
            rows.append(f"| {stage.name} | {job.name} | {status} | {state.attempt} | {detail} |")
    return "\n".join(rows)


def _statuses(root: Path, plan: Plan) -> dict[str, str]:
    return {job.name: current_status(root, job)[0] for job in plan.jobs()}


def _failures(root: Path, jobs: list[Job]) -> list[str]:
    lines = []
    for job in jobs:
        status, state = current_status(root, job)
        if status == "done":
            continue
        reason = state.reason or status
        if status == "lost" and not state.pid and state.slurm_job:
            reason = f"SLURM job {state.slurm_job} ended without starting (cancelled: a job it depends on failed?)"
        log_path = "" if state.log and str(state.log) in reason else f" (log: {state.log or 'none'})"
        lines.append(f"  {job.name}: {status}: {reason}{log_path}")
    return lines


def _stop(root: Path, plan: Plan, failed: list[str]) -> PipelineStopped:
    return PipelineStopped(
        f"the pipeline in {root} stopped: {len(failed)} job(s) did not finish\n" + "\n".join(failed) + "\n"
        "The finished jobs are kept; nothing was merged. Fix the cause (see the log) and run the same "
        f"`connito {plan.kind}` command again: only these jobs (and the stages after them) run.\n"
        f"{status_table(root, plan)}"
    )


def pending_stages(root: Path, plan: Plan, rerun: str, changed: int | None = None) -> int | None:
    """Reset what must run again (everything with ``rerun=all``; the stages from ``changed`` on, whose settings
    changed); returns the index of the first stage with work, or None when all is done."""
    if rerun == "all":
        for job in plan.jobs():
            reset_state(root, job, clean=True)
    elif changed is not None:
        log.info("the settings of stage %s changed: it and the stages after it run again", plan.stages[changed].name)
        for stage in plan.stages[changed:]:
            for job in stage.jobs:
                reset_state(root, job, clean=True)
    statuses = _statuses(root, plan)
    first = next((i for i, s in enumerate(plan.stages) if any(statuses[j.name] != "done" for j in s.jobs)), None)
    if first is None:
        return None
    for stage in plan.stages[first + 1 :]:
        for job in stage.jobs:
            reset_state(root, job, clean=True)
    return first


def _refuse_running(root: Path, plan: Plan) -> None:
    alive = [job.name for job in plan.jobs() if current_status(root, job)[0] in ("running", "queued")]
    if alive:
        raise OrchestrationError(
            f"job(s) {alive} of {root} are still running or queued: wait for them (run the same command again "
            "later), or stop them (kill their process group / scancel) first\n" + status_table(root, plan)
        )


def run_pipeline(root: Path, plan: Plan, launcher: LauncherConfig, rerun: str = "missing", run_name: str = "") -> None:
    """Plan, run what is not done, and raise :class:`OrchestrationError` naming the jobs that failed."""
    check_launcher(launcher, rerun)
    root = Path(root).resolve()
    _refuse_running(root, read_plan(root) if (root / PLAN_FILE).is_file() else plan)
    changed = write_plan(root, plan, replace=rerun == "all")
    first = pending_stages(root, plan, rerun, changed)
    if first is None:
        log.info("every job of %s is done", root)
        return
    if launcher.kind == "slurm":
        _run_slurm(root, plan, first, launcher, run_name or root.name)
        return
    for stage in plan.stages[first:]:
        todo = [job for job in stage.jobs if current_status(root, job)[0] != "done"]
        if todo:
            log.info("stage %s: %d job(s) to run: %s", stage.name, len(todo), ", ".join(j.name for j in todo))
            run_local(root, todo, launcher.max_parallel)
        failed = _failures(root, list(stage.jobs))
        if failed:
            raise _stop(root, plan, failed)


def _run_slurm(root: Path, plan: Plan, first: int, launcher: LauncherConfig, run_name: str) -> None:
    after = None
    for stage in plan.stages[first:]:
        todo = [job for job in stage.jobs if current_status(root, job)[0] != "done"]
        if todo:
            after = submit_slurm(root, stage.name, todo, launcher, run_name, after)
    if not launcher.wait:
        log.info("submitted; run the same command again to see where the pipeline stands\n%s", status_table(root, plan))
        return
    last = list(plan.stages[-1].jobs)
    while True:
        statuses = _statuses(root, plan)
        bad = [name for name, status in statuses.items() if status in ("failed", "lost")]
        running = [name for name, status in statuses.items() if status == "running"]
        if (bad and not running) or all(statuses[job.name] in FINISHED for job in last):
            break
        time.sleep(launcher.poll_seconds)
    failed = _failures(root, plan.jobs())
    if failed:
        raise _stop(root, plan, failed)
