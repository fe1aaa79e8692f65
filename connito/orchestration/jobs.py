"""Jobs of a pipeline and their state on disk.

A :class:`Job` is one ``connito`` command line (``train model.path=... data.domains=[code] ...``) with the files it
must leave behind; a :class:`Stage` is jobs that may run at the same time. A job's state is one JSON file,
``<root>/jobs/<job>.json`` (schema ``connito.job/1``), written by the process that runs it
(:mod:`connito.orchestration.runner`) whatever launched it -- a local process, torchrun, or a SLURM array task --
so the orchestrator, a later invocation, or a user with ``cat`` can tell which jobs finished:

| status      | meaning                                                                                      |
|-------------|----------------------------------------------------------------------------------------------|
| ``pending`` | no state file: never started, or reset because a job it depends on was rerun                  |
| ``queued``  | submitted to SLURM, not started yet                                                          |
| ``running`` | its runner is alive (checked by pid on this host, by ``squeue`` for SLURM jobs)               |
| ``done``    | the command exited 0 and every output exists                                                 |
| ``failed``  | the command exited non-zero (or was terminated); ``rc`` and the log say why                   |
| ``lost``    | the state says running/queued but the process or SLURM job is gone (killed, node lost, OOM)   |

``done`` whose outputs have since disappeared reads as ``failed`` (with the missing file named), so a pipeline never
builds on a deleted checkpoint.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from connito.common.atomic import atomic_write_json
from connito.common.errors import ReportedFailure
from connito.common.records import read_json_record

JOB_SCHEMA = "connito.job/1"
FINISHED = ("done", "failed", "lost")


class OrchestrationError(RuntimeError):
    """A pipeline that cannot go on: the message names the jobs, their state and what to do."""


class PipelineStopped(OrchestrationError, ReportedFailure):
    """Jobs of the pipeline failed or were lost: the message names each with its reason and log, and how to run
    only the unfinished jobs (``connito <pipeline>`` prints it without a traceback, exit status 1)."""


@dataclass(frozen=True)
class Job:
    name: str
    """Unique within the pipeline; the state file, log and SLURM task are named after it."""
    command: tuple[str, ...]
    """``connito`` arguments: the command's words, then its overrides (arguments of ``module``)."""
    outputs: tuple[str, ...] = ()
    """Files (absolute paths) that must exist once the job is done."""
    ranks: int = 1
    """Processes the job runs as (torchrun ``--nproc_per_node``); 1 runs ``python -m connito`` directly."""
    module: str = "connito"
    """The Python module run with ``-m`` (``connito``; a plugin's own entry point for jobs that are not connito
    commands)."""
    workdir: str = ""
    """The directory the job writes (its run directory). A job rerun after a failure keeps it (``connito train``
    resumes from its last checkpoint there); a job reset because something it depends on changed, or by
    ``rerun=all``, has it deleted first, so it never resumes from a result built on older inputs."""

    def to_dict(self) -> dict:
        return {"name": self.name, "command": list(self.command), "outputs": list(self.outputs), "ranks": self.ranks,
                "module": self.module, "workdir": self.workdir}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(data["name"], tuple(data["command"]), tuple(data.get("outputs", ())), int(data.get("ranks", 1)),
                   data.get("module", "connito"), data.get("workdir", ""))  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str
    jobs: tuple[Job, ...]
    settings: dict = field(default_factory=dict)
    """Settings this stage is the first to use (a merge's options, a report's token budget): changing them on a
    rerun reruns this stage and the ones after it, and keeps what came before."""

    def to_dict(self) -> dict:
        return {"name": self.name, "jobs": [job.to_dict() for job in self.jobs], "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict) -> Stage:
        return cls(data["name"], tuple(Job.from_dict(job) for job in data["jobs"]), data.get("settings", {}))


@dataclass
class JobState:
    job: str
    status: str = "pending"
    attempt: int = 0
    host: str = ""
    pid: int | None = None
    slurm_job: str = ""
    rc: int | None = None
    started: str = ""
    ended: str = ""
    log: str = ""
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    """Earlier attempts: status, rc, started, ended, reason."""

    def to_dict(self) -> dict:
        return {"schema": JOB_SCHEMA, **{k: v for k, v in self.__dict__.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> JobState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def state_path(root: Path, job: str) -> Path:
    return Path(root) / "jobs" / f"{job}.json"


def log_path(root: Path, job: str) -> Path:
    return Path(root) / "logs" / f"{job}.log"


def read_state(root: Path, job: str) -> JobState:
    path = state_path(root, job)
    if not path.is_file():
        return JobState(job)
    fix = f"delete {path} to run job {job} again (rerun=all starts the whole pipeline over)"
    return JobState.from_dict(read_json_record(path, JOB_SCHEMA, what="job state", fix=fix, error=OrchestrationError))


def write_state(root: Path, state: JobState) -> None:
    """Atomic (write then rename): a reader never sees half a state file."""
    atomic_write_json(state_path(root, state.job), state.to_dict())


def reset_state(root: Path, job: Job, *, clean: bool) -> None:
    """Back to ``pending`` (the history of earlier attempts is kept); ``clean`` also deletes its workdir."""
    if clean and job.workdir and Path(job.workdir).exists():
        shutil.rmtree(job.workdir)
    state = read_state(root, job.name)
    if state.status == "pending":
        return
    history = [*state.history, _attempt_record(state)]
    write_state(root, JobState(job.name, attempt=state.attempt, history=history))


def _attempt_record(state: JobState) -> dict:
    return {k: getattr(state, k) for k in ("attempt", "status", "rc", "started", "ended", "reason", "slurm_job")}


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def slurm_job_alive(job_id: str) -> bool | None:
    """Whether SLURM still lists the job as pending or running; None when ``squeue`` is not available."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:  # an id SLURM has forgotten is an error, not an empty list
        return False
    return bool(out.stdout.strip())


def current_status(root: Path, job: Job) -> tuple[str, JobState]:
    """The job's status (see the module docstring), checking liveness and outputs, with its state."""
    state = read_state(root, job.name)
    status = state.status
    if status in ("running", "queued"):
        if state.slurm_job:
            alive = slurm_job_alive(state.slurm_job)
            status = status if alive in (True, None) else "lost"
        elif state.host == socket.gethostname() and not pid_alive(state.pid):
            status = "lost"
    if status == "done":
        missing = [path for path in job.outputs if not Path(path).exists()]
        if missing:
            state.reason = f"output {missing[0]} is missing"
            status = "failed"
    if status == "lost" and not state.reason:
        where = f"SLURM job {state.slurm_job}" if state.slurm_job else f"pid {state.pid} on {state.host}"
        state.reason = f"{where} is gone without a result (killed?)"
    return status, state
