"""Run one job of a pipeline and record its state: ``python -m connito.orchestration.runner <root> <job>``.

This is the process every launcher starts (a local subprocess, a SLURM array task): it reads the job from
``<root>/pipeline.json``, writes ``running`` (host, pid, SLURM ids), runs the ``connito`` command as a child
(through ``torchrun --standalone`` when the job has several ranks), appends its output to ``<root>/logs/<job>.log``,
and writes ``done`` (exit 0 and every output present) or ``failed`` (with the exit code, or the missing output).
SIGTERM/SIGINT (``scancel``, Ctrl-C) are passed to the child and recorded as ``failed``; a SIGKILL leaves
``running`` behind, which :func:`connito.orchestration.jobs.current_status` reads as ``lost``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from connito.orchestration.jobs import Job, JobState, log_path, now, read_state, write_state
from connito.orchestration.plan import read_plan


def job_argv(job: Job) -> list[str]:
    """The child's command line: ``python -m connito ...``, or torchrun with ``job.ranks`` processes."""
    if job.ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.ranks}",
                "-m", job.module, *job.command]  # fmt: skip
    return [sys.executable, "-m", job.module, *job.command]


def job_environment(job: Job) -> dict[str, str]:
    env = dict(os.environ)
    if job.ranks > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
        # a SLURM array task must not look like a multi-task srun step to the trainer's rank discovery
        for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            env.pop(key, None)
    return env


def run_job(root: Path, name: str) -> int:
    root = Path(root)
    plan = read_plan(root)
    job = plan.job(name)
    previous = read_state(root, name)
    log = log_path(root, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_JOB_ID")
    slurm_job = f"{slurm[0]}_{slurm[1]}" if slurm[0] and slurm[1] else (slurm[2] or "")
    state = JobState(
        name,
        status="running",
        attempt=previous.attempt + (0 if previous.status == "queued" else 1),
        host=socket.gethostname(),
        pid=os.getpid(),
        slurm_job=slurm_job,
        started=now(),
        log=str(log),
        history=previous.history,
    )
    write_state(root, state)
    with open(log, "a") as out:
        out.write(f"\n===== {name}: attempt {state.attempt} on {state.host} at {state.started}\n")
        out.write(f"$ {job.module} " + " ".join(job.command) + "\n")
        out.flush()
        child = subprocess.Popen(job_argv(job), stdout=out, stderr=subprocess.STDOUT, env=job_environment(job))
        stopped: list[int] = []

        def forward(signum, _frame):
            stopped.append(signum)
            child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        rc = child.wait()
    missing = [path for path in job.outputs if not Path(path).exists()]
    state.rc, state.ended = rc, now()
    if stopped:
        state.status, state.reason = "failed", f"terminated by {signal.Signals(stopped[0]).name}"
    elif rc != 0:
        state.status, state.reason = "failed", f"exit code {rc}; see {log}"
    elif missing:
        state.status, state.reason = "failed", f"exited 0 but did not write {missing[0]}"
    else:
        state.status, state.reason = "done", ""
    write_state(root, state)
    return 0 if state.status == "done" else (rc or 1)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m connito.orchestration.runner <pipeline root> <job name>", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_job(Path(args[0]), args[1]))


if __name__ == "__main__":
    main()
