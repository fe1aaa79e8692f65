"""Orchestration (beside the CLI, layer 6): run a composition as independent jobs -- local processes, torchrun
jobs or SLURM job arrays -- whose state lives on disk, so a pipeline survives its orchestrator, reruns only what
failed, and never builds a stage on an incomplete one.

- :mod:`~connito.orchestration.jobs`: :class:`Job`, :class:`Stage` and the per-job state files;
- :mod:`~connito.orchestration.plan`: ``pipeline.json``, the plan a rerun must match;
- :mod:`~connito.orchestration.runner`: the process that runs one job and records its state;
- :mod:`~connito.orchestration.launchers`: local / torchrun processes, SLURM arrays;
- :mod:`~connito.orchestration.pipeline`: :func:`run_pipeline`, stage after stage;
- :mod:`~connito.orchestration.btx` (and the other recipes): what each composition method's stages are.
"""

from connito.orchestration.config import LauncherConfig, SlurmConfig
from connito.orchestration.jobs import Job, OrchestrationError, PipelineStopped, Stage
from connito.orchestration.pipeline import run_pipeline, status_table
from connito.orchestration.plan import Plan, read_plan

__all__ = [
    "Job",
    "LauncherConfig",
    "OrchestrationError",
    "PipelineStopped",
    "Plan",
    "SlurmConfig",
    "Stage",
    "read_plan",
    "run_pipeline",
    "status_table",
]
