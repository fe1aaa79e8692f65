"""What every composition pipeline (``connito btx``, ``connito flexolmo``, ``connito groups``) builds its plan
from: training jobs that are ``connito train`` command lines, jobs that rerun the composition command itself for
one in-process stage (a merge, a report), and the check that a stage's inputs are all done before it reads them.
"""

from __future__ import annotations

from pathlib import Path

from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Job, OrchestrationError, current_status
from connito.orchestration.overrides import override_value
from connito.orchestration.plan import Plan, read_plan
from connito.training.config import RunConfig

WEIGHTS = "model.safetensors"


def check_domain_names(what: str, names: list[str], known: list[str]) -> None:
    """``ValueError`` naming the fix when ``names`` (the option ``what``) repeats a domain or names one that is not
    in ``known`` (``data.domains``)."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"{what}={names}: {', '.join(twice)} given twice; name each once")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"{what}: unknown domain(s) {', '.join(map(repr, unknown))}; the known ones (data.domains): "
            f"{', '.join(known)} (add a recipe domain to data.domains to use it)"
        )


def run_root(run: RunConfig) -> Path:
    """The pipeline's directory: ``<run.root>/<run.name>``, absolute (jobs may run elsewhere)."""
    return (Path(run.root) / run.name).resolve()


def job_ranks(launcher: LauncherConfig) -> int:
    """Processes per training job: ``nproc_per_node`` under torchrun and SLURM, 1 as local processes."""
    return launcher.nproc_per_node if launcher.kind != "local" else 1


def train_job(
    name: str, root: Path, overrides: list[str], steps: int, ranks: int, train_overrides: list[str],
    command: str = "train",
) -> Job:  # fmt: skip
    """A ``connito train`` (or ``adapt``) job whose run directory is ``<root>/<name>`` and whose output is its HF
    export; ``train_overrides`` (the user's) come last so they win."""
    argv = [
        command,
        f"run.root={override_value(str(root))}",
        f"run.name={name}",
        f"train.steps={steps}",
        *(["analysis=none"] if command == "train" else []),
        "logging.wandb=false",
        *overrides,
        *train_overrides,
    ]
    return Job(name, tuple(argv), (str(root / name / "hf" / WEIGHTS),), ranks, workdir=str(root / name))


def stage_job(kind: str, name: str, root: Path, stage: str, output: Path, *extra: str, workdir: str = "") -> Job:
    """A job that runs ``connito <kind> stage=<stage>`` on the pipeline in ``root`` (its settings come from the
    plan there, not from the command line)."""
    command = [kind, f"run.root={override_value(str(root.parent))}", f"run.name={root.name}", f"stage={stage}", *extra]
    return Job(name, tuple(command), (str(output),), workdir=workdir)


def planned(root: Path, kind: str) -> Plan:
    """The plan in ``root``, which must be a ``kind`` pipeline."""
    plan = read_plan(root)
    if plan.kind != kind:
        raise OrchestrationError(f"{root} holds a {plan.kind} pipeline, not a {kind} one")
    return plan


def require_done(root: Path, plan: Plan, stage: str, what: str = "nothing was merged") -> None:
    """Refuse to go on unless every job of ``stage`` is done (a stage run by hand is checked too)."""
    stage_jobs = next(s.jobs for s in plan.stages if s.name == stage)
    statuses = {job.name: current_status(root, job)[0] for job in stage_jobs}
    missing = [f"{name} ({status})" for name, status in statuses.items() if status != "done"]
    if missing:
        raise OrchestrationError(
            f"not every {stage} job of {root} is done: {', '.join(missing)}. Run `connito {plan.kind}` with the "
            f"same settings to finish them; {what}"
        )


def mean_hidden_rows(model_dir: Path, data, domain_sets: list[list[str]], tokens_per_domain: int):
    """Router rows from text: [L, len(domain_sets), H], row i of every layer the mean FFN input of the model at
    ``model_dir`` over the training text of ``domain_sets[i]`` (``tokens_per_domain`` tokens per domain;
    :func:`connito.composition.hidden_means.mean_ffn_inputs`). BTX starts its merged router this way
    (``mix.router_init=domain_means``), FlexOLMo an owner's row (offline stand-in for its external embedder)."""
    import torch

    from connito.analysis.held_out import held_out_batches, load_checkpoint
    from connito.composition.hidden_means import mean_ffn_inputs

    model = load_checkpoint(model_dir)
    rows = []
    for domains in domain_sets:
        tokens = tokens_per_domain * len(domains)
        batches = held_out_batches(data, model_dir, domains=list(domains), eval_tokens=tokens, split="train")
        rows.append(mean_ffn_inputs(model, batches.inputs))
    return torch.stack(rows, dim=1)
