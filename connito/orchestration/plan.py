"""A pipeline's plan: ``<root>/pipeline.json`` (schema ``connito.pipeline/1``), the stages and jobs a composition
command decided on, written before anything runs.

The plan is what makes a rerun safe: a second invocation with the same settings finds the same jobs and runs only
those that are not done; one with other settings (another domain list, step count, seed) is refused with the first
difference, because mixing branches trained under two plans into one merge would be silent nonsense. The job
runner reads its command from here, so a SLURM task and a local process run exactly the same line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from connito.orchestration.jobs import Job, OrchestrationError, Stage

PLAN_SCHEMA = "connito.pipeline/1"
PLAN_FILE = "pipeline.json"


@dataclass(frozen=True)
class Plan:
    kind: str
    """What composes: ``btx``, ``flexolmo``, ``groups``."""
    stages: tuple[Stage, ...]
    settings: dict = field(default_factory=dict)
    """The settings that define the result (compared on rerun); launcher choices are not among them."""

    def __post_init__(self):
        names = [job.name for stage in self.stages for job in stage.jobs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise OrchestrationError(f"job names must be unique in a pipeline; repeated: {repeated}")

    def job(self, name: str) -> Job:
        for stage in self.stages:
            for job in stage.jobs:
                if job.name == name:
                    return job
        raise OrchestrationError(f"no job '{name}' in this pipeline; its jobs: {[j.name for j in self.jobs()]}")

    def jobs(self) -> list[Job]:
        return [job for stage in self.stages for job in stage.jobs]

    def stage_of(self, name: str) -> int:
        return next(i for i, stage in enumerate(self.stages) if any(job.name == name for job in stage.jobs))

    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "kind": self.kind,
            "settings": self.settings,
            "stages": [stage.to_dict() for stage in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("schema") != PLAN_SCHEMA:
            raise OrchestrationError(f"not a {PLAN_SCHEMA} plan (schema {data.get('schema')!r})")
        return cls(data["kind"], tuple(Stage.from_dict(s) for s in data["stages"]), data.get("settings", {}))


def read_plan(root: Path) -> Plan:
    path = Path(root) / PLAN_FILE
    if not path.is_file():
        raise OrchestrationError(f"{path} does not exist: no pipeline was planned in {root}")
    return Plan.from_dict(json.loads(path.read_text()))


def first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} before, {b!r} now"
    return None


def write_plan(root: Path, plan: Plan, *, replace: bool = False) -> None:
    """Write ``plan`` into ``root``; an existing plan must be the same one unless ``replace``."""
    root = Path(root)
    path = root / PLAN_FILE
    if path.is_file() and not replace:
        old = json.loads(path.read_text())
        difference = first_difference(
            {"kind": old.get("kind"), "settings": old.get("settings", {}), "stages": old.get("stages")},
            {"kind": plan.kind, "settings": plan.settings, "stages": plan.to_dict()["stages"]},
        )
        if difference is not None:
            if difference.startswith("stages"):
                difference = "the jobs' command lines differ"
            raise OrchestrationError(
                f"{root} holds a {old.get('kind')} pipeline planned with other settings ({difference}). Use another "
                "run.name, or rerun=all to discard its jobs' states and start over"
            )
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=1))
    tmp.replace(path)
