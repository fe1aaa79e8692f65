"""A pipeline's plan: ``<root>/pipeline.json`` (schema ``connito.pipeline/1``), the stages and jobs a composition
command decided on, written before anything runs.

The plan is what makes a rerun safe. A second invocation with the same settings finds the same jobs and runs only
those that are not done. One whose settings differ only from some stage on (a stage's own ``settings``, such as
the merge's options, or its jobs' command lines) keeps the stages before it and reruns that stage and every later
one. One whose pipeline-wide settings differ (another domain list, seed, data) is refused with the first
difference, because mixing branches trained under two plans into one merge would be silent nonsense. The job
runner reads its command from here, so a SLURM task and a local process run exactly the same line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from connito.common.atomic import atomic_write_json
from connito.common.records import check_schema, read_json_record
from connito.orchestration.jobs import Job, OrchestrationError, Stage

PLAN_SCHEMA = "connito.pipeline/1"
PLAN_FILE = "pipeline.json"
PLAN_FIX = "use another run.name, or rerun=all to plan the pipeline again (its jobs' states are discarded)"


@dataclass(frozen=True)
class Plan:
    kind: str
    """What composes: ``btx``, ``flexolmo``, ``groups``."""
    stages: tuple[Stage, ...]
    settings: dict = field(default_factory=dict)
    """The pipeline-wide settings that define the result (a difference on rerun is refused); launcher choices
    are not among them. Settings only some stages use are those stages' own (:attr:`Stage.settings`)."""

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

    def all_settings(self) -> dict:
        """The pipeline-wide settings with every stage's own: what an in-process stage (a merge, a report) reads."""
        merged = dict(self.settings)
        for stage in self.stages:
            merged.update(stage.settings)
        return merged

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
    def from_dict(cls, data: dict, path: str | Path = "the plan") -> Plan:
        check_schema(
            data.get("schema"), path, PLAN_SCHEMA, what="pipeline plan", fix=PLAN_FIX, error=OrchestrationError
        )
        return cls(data["kind"], tuple(Stage.from_dict(s) for s in data["stages"]), data.get("settings", {}))

    @classmethod
    def load(cls, root: str | Path) -> Plan:
        """The plan in ``root`` (``<root>/pipeline.json``), its schema and version checked."""
        path = Path(root) / PLAN_FILE
        if not path.is_file():
            raise OrchestrationError(f"{path} does not exist: no pipeline was planned in {root}")
        record = read_json_record(path, PLAN_SCHEMA, what="pipeline plan", fix=PLAN_FIX, error=OrchestrationError)
        return cls.from_dict(record, path)

    def save(self, root: str | Path) -> Path:
        """Write ``<root>/pipeline.json`` atomically."""
        return atomic_write_json(Path(root) / PLAN_FILE, self.to_dict())


def read_plan(root: Path) -> Plan:
    return Plan.load(root)


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


def first_changed_stage(old: Plan, new: Plan) -> int | None:
    """The index of the first stage whose jobs or own settings differ between two plans (None: the same)."""
    for index, (a, b) in enumerate(zip(old.stages, new.stages)):
        if a.to_dict() != b.to_dict():
            return index
    if len(old.stages) != len(new.stages):
        return min(len(old.stages), len(new.stages))
    return None


def _check_workdirs(root: Path, plan: Plan) -> None:
    """A job's workdir is deleted when the job runs again: it must not hold the pipeline's own directory."""
    top = root.resolve()
    for job in plan.jobs():
        if job.workdir and (top == Path(job.workdir).resolve() or top.is_relative_to(Path(job.workdir).resolve())):
            raise OrchestrationError(
                f"job {job.name}: its workdir {job.workdir} holds the pipeline directory {root}, and a rerun deletes "
                "a job's workdir; give the job a directory of its own under the pipeline's"
            )


def write_plan(root: Path, plan: Plan, *, replace: bool = False) -> int | None:
    """Write ``plan`` into ``root``. An existing plan must have the same kind and pipeline-wide settings (unless
    ``replace``); returns the index of the first stage that changed against it (None: nothing changed, or no
    plan was there), whose jobs and every later stage's must run again."""
    root = Path(root)
    _check_workdirs(root, plan)
    path = root / PLAN_FILE
    changed = None
    if path.is_file() and not replace:
        old = Plan.load(root)
        difference = first_difference(
            {"kind": old.kind, "settings": old.settings},
            {"kind": plan.kind, "settings": plan.settings},
        )
        if difference is not None:
            raise OrchestrationError(
                f"{root} holds a {old.kind} pipeline planned with other settings ({difference}). Use another "
                "run.name, or rerun=all to discard its jobs' states and start over"
            )
        changed = first_changed_stage(old, plan)
    plan.save(root)
    return changed
