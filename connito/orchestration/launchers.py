"""Launch a stage's jobs: as processes of this machine (``local``, ``torchrun``) or as a SLURM job array.

Every launcher starts the same thing per job, the runner (:mod:`connito.orchestration.runner`), which records
the job's state itself; launchers only start, wait and report.

- :func:`run_local`: up to ``max_parallel`` runners at once, each in its own session (process group), so one
  job can be killed with its children (``kill -- -<pgid>``) without touching the others. Blocks until the stage
  is over; Ctrl-C terminates the running jobs (their states say ``failed: terminated``).
- :func:`submit_slurm`: writes ``<root>/slurm/<stage>.sbatch`` (an array, one task per job) and submits it with
  ``sbatch --parsable``, after the previous stage's array (``--dependency=afterok:<id>``,
  ``--kill-on-invalid-dep=yes``: if a job of the previous stage fails, the dependent stage is cancelled, not left
  pending forever). The jobs' states become ``queued`` with their array task ids.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Job, JobState, OrchestrationError, log_path, now, read_state, write_state

log = logging.getLogger("connito.orchestration")


def runner_argv(root: Path, job: Job) -> list[str]:
    return [sys.executable, "-m", "connito.orchestration.runner", str(Path(root).resolve()), job.name]


def run_local(root: Path, jobs: Sequence[Job], max_parallel: int) -> None:
    """Run the runners of ``jobs``, at most ``max_parallel`` at once; returns when all have ended."""
    waiting = list(jobs)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    finished = 0
    try:
        while waiting or running:
            while waiting and len(running) < max_parallel:
                job = waiting.pop(0)
                process = subprocess.Popen(runner_argv(root, job), start_new_session=True)
                running[job.name] = (process, time.monotonic())
                log.info("started %s (pid %d; log %s)", job.name, process.pid, log_path(root, job.name))
            for name, (process, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                finished += 1
                state = read_state(root, name)
                status = state.status if state.status != "running" else "lost"
                reason = f": {state.reason}" if state.reason else ""
                log.info("%s %s after %.0f s (%d of %d ended)%s", name, status, time.monotonic() - started,
                         finished, len(jobs), reason)  # fmt: skip
            time.sleep(0.2)
    except KeyboardInterrupt:
        for process, _ in running.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process, _ in running.values():
            process.wait()
        raise


def sbatch_script(root: Path, stage: str, jobs: Sequence[Job], cfg: LauncherConfig, run_name: str) -> str:
    slurm = cfg.slurm
    ranks = max(job.ranks for job in jobs)
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by connito for stage '{stage}' of {root}: one array task per job; each task runs the job's",
        "# runner, which records the job's state in <root>/jobs/<job>.json and its output in <root>/logs/<job>.log.",
        f"#SBATCH --job-name=connito-{run_name}-{stage}",
        f"#SBATCH --array=0-{len(jobs) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task or ranks}",
        f"#SBATCH --output={root}/logs/slurm-{stage}-%A_%a.out",
        f"#SBATCH --chdir={Path.cwd()}",
        "#SBATCH --export=ALL",
    ]
    if slurm.partition:
        lines.append(f"#SBATCH --partition={slurm.partition}")
    if slurm.time:
        lines.append(f"#SBATCH --time={slurm.time}")
    if slurm.gpus_per_task:
        lines.append(f"#SBATCH --gpus={slurm.gpus_per_task}")
    if slurm.mem:
        lines.append(f"#SBATCH --mem={slurm.mem}")
    lines += [f"#SBATCH {arg}" for arg in slurm.sbatch_args]
    names = " ".join(shlex.quote(job.name) for job in jobs)
    lines += [
        "set -euo pipefail",
        f"JOBS=({names})",
        f"exec {shlex.quote(sys.executable)} -m connito.orchestration.runner {shlex.quote(str(root))} "
        '"${JOBS[$SLURM_ARRAY_TASK_ID]}"',
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(
    root: Path, stage: str, jobs: Sequence[Job], cfg: LauncherConfig, run_name: str, after: str | None
) -> str:
    """Submit ``jobs`` as one array (after the array ``after``, when given); returns the array's job id."""
    root = Path(root).resolve()
    script = root / "slurm" / f"{stage}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    script.write_text(sbatch_script(root, stage, jobs, cfg, run_name))
    argv = ["sbatch", "--parsable"]
    if after:
        argv += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    try:
        out = subprocess.run([*argv, str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise OrchestrationError(
            "launcher.kind=slurm needs sbatch on PATH: run on a SLURM login node (or launcher.kind=local)"
        ) from None
    if out.returncode != 0:
        raise OrchestrationError(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}")
    array_id = out.stdout.strip().split(";")[0]
    for index, job in enumerate(jobs):
        previous = read_state(root, job.name)
        write_state(
            root,
            JobState(
                job.name,
                status="queued",
                attempt=previous.attempt + 1,
                slurm_job=f"{array_id}_{index}",
                started=now(),
                log=str(log_path(root, job.name)),
                history=previous.history,
            ),
        )
    log.info("submitted stage %s as SLURM array %s (%d jobs%s)", stage, array_id, len(jobs),
             f", after {after}" if after else "")  # fmt: skip
    return array_id
