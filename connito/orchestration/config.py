"""Typed configs shared by the composition commands (``connito btx``, ``connito flexolmo``, ``connito groups``):
how their jobs are launched and what a rerun does."""

from __future__ import annotations

from dataclasses import dataclass, field

LAUNCHERS = ("local", "torchrun", "slurm")
RERUNS = ("missing", "all")


@dataclass
class SlurmConfig:
    """``launcher.kind=slurm``: each stage is one ``sbatch`` job array, each stage after the first depends on the
    previous one (``--dependency=afterok``). The generated scripts are kept in ``<run>/slurm/``."""

    partition: str = ""
    """``--partition``; empty: the cluster's default."""
    time: str = ""
    """``--time`` per job, e.g. ``04:00:00``; empty: the partition's default."""
    cpus_per_task: int = 0
    """``--cpus-per-task``; 0: ranks of the job (one CPU a rank)."""
    gpus_per_task: int = 0
    """``--gpus`` per job (its ranks run on them through torchrun); 0: none requested."""
    mem: str = ""
    """``--mem`` per job, e.g. ``64G``; empty: the partition's default."""
    sbatch_args: list[str] = field(default_factory=list)
    """More sbatch options, one per item, e.g. ``[--account=lab, --qos=high]``."""


@dataclass
class LauncherConfig:
    kind: str = "local"
    """``local``: each job a process of this machine; ``torchrun``: each training job a torchrun of
    ``nproc_per_node`` ranks on this machine; ``slurm``: job arrays submitted with ``sbatch``."""
    max_parallel: int = 2
    """local / torchrun: jobs running at once."""
    nproc_per_node: int = 1
    """Ranks per training job (torchrun and slurm; local runs one process per job)."""
    wait: bool = True
    """slurm: wait for the pipeline to finish (polling the jobs' state files), then print the results. false:
    submit and return; run the same command again later to see where it stands."""
    poll_seconds: float = 5.0
    """slurm with wait: seconds between looks at the job states."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def check_launcher(cfg: LauncherConfig, rerun: str) -> None:
    if cfg.kind not in LAUNCHERS:
        raise ValueError(f"launcher.kind={cfg.kind!r}: choose one of {', '.join(LAUNCHERS)}")
    if rerun not in RERUNS:
        raise ValueError(
            f"rerun={rerun!r}: missing (run the jobs that are not done, keep the rest) or all (start over)"
        )
    if cfg.max_parallel < 1 or cfg.nproc_per_node < 1:
        raise ValueError("launcher.max_parallel and launcher.nproc_per_node must be at least 1")
    if cfg.kind == "local" and cfg.nproc_per_node != 1:
        raise ValueError(
            "launcher.kind=local runs one process per job: use launcher.kind=torchrun for nproc_per_node>1"
        )
