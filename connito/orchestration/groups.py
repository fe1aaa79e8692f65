"""``connito groups``: expert-group jobs as a pipeline of independent jobs -- a base MoE's routed experts split into
disjoint groups, one per domain, each group trained by its own job that touches only its experts, the jobs' delta
packages merged back onto the base (:mod:`connito.composition.expert_groups`).

Stages (each a set of jobs, each job one ``connito`` command with its own directory under ``<run>/``):

- ``base`` (only without ``base.path``): ``connito train`` of the MoE preset ``base.model`` on every domain of
  ``data``;
- ``analyze``: ``connito analyze model_path=<base> out_dir=<run>/analysis`` on the groups' domains' training
  text (``split=train``, as ESFT selects; the causal driver scan only for ``partition.score=driver``);
- ``partition``: ``connito groups stage=partition``,
  :func:`~connito.composition.expert_groups.partition.partition_from_analysis` then
  :func:`~connito.composition.expert_groups.partition.write_group_masks`: ``<run>/groups/<domain>.mask.json``
  (masks of the base) and ``groups/partition.json`` (every group's experts); prints the groups;
- ``groups``: one ``group-<domain>`` job per domain, ``connito adapt method=esft esft.mask_file=<its mask>
  model.path=<base> data.domains=[<domain>]``: slice-exact gradient masks train that group's experts and nothing
  else; it writes ``group-<domain>/hf`` and the delta package ``group-<domain>/delta``;
- ``merge``: ``connito groups stage=merge``: every group job done, then
  :func:`~connito.composition.expert_groups.merge.merge_groups` of the base and every delta into ``merged/`` with
  ``merge.overlap``; with ``merge.validate`` the staged merge is measured first
  (:func:`~connito.composition.expert_groups.validation.held_out_validator`) and refused, nothing written, when
  any domain's held-out loss rose more than ``merge.max_regression`` nats over the base's: the job fails with the
  table of numbers in its log (and on the orchestrator's stderr) and the pipeline stops there;
- ``report``: ``connito groups stage=report``, held-out loss per domain of the base, each group's adapted model
  and the merged model (``groups_report.md`` / ``.json``).

**Decisions.** The analysis reads the training split (what ``connito adapt method=esft`` selects on without a
mask file), so the held-out rows of the merge's acceptance test and of the report never chose the experts.
``partition.analysis_tokens`` and ``eval_tokens`` are per domain (the analysis and the measurements stream that
times the number of domains). The acceptance test and the report measure the same held-out rows, so the report's
base and merged rows are the numbers the merge was accepted on. Each group job also measures itself against the
base on every group domain (``outcome.eval_domains``: its gain and the forgetting it causes alone, in
``group-<domain>/adapt.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from connito.common.atomic import atomic_write_json
from connito.common.records import JsonRecord
from connito.composition.provenance import GroupsRecord
from connito.data.config import DataConfig
from connito.models.presets import model_preset
from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Job, Stage, current_status
from connito.orchestration.overrides import changed_overrides, override_value
from connito.orchestration.plan import Plan
from connito.orchestration.recipe import (
    WEIGHTS,
    check_domain_names,
    job_ranks,
    planned,
    require_done,
    run_root,
    stage_job,
    train_job,
)
from connito.training.config import RunConfig

log = logging.getLogger("connito.orchestration")

SCORES = ("gate", "token", "driver")
PARTITION_OVERLAPS = ("assign", "refuse")
MERGE_OVERLAPS = ("refuse", "average", "first")
REPORT = "groups_report"
PARTITION_FILE = "partition.json"


@dataclass(frozen=True, kw_only=True)
class PartitionRecord(JsonRecord):
    """``groups/partition.json``: the base and its analysis, the selection options, and per domain its mask file
    and experts (``groups``: domain -> ``{"mask_file", "experts": [[layer, expert], ...]}``)."""

    SCHEMA: ClassVar[str] = "connito.groups_partition/1"
    INDENT: ClassVar[int | None] = 1
    WHAT: ClassVar[str] = "groups partition record"
    FIX: ClassVar[str] = "run the partition job again (`connito groups` with the same settings)"

    base: str
    analysis: str
    score: str
    top_p: float | None
    top_n: int | None
    overlap: str
    groups: Mapping[str, Mapping[str, Any]]


MASK_SUFFIX = ".mask.json"
DELTA_MANIFEST = "manifest.json"


@dataclass
class BaseModelConfig:
    """The base model the groups are split from (``base.*``): an existing MoE checkpoint or a preset to train."""

    path: str = ""
    """An MoE checkpoint directory to split into groups; the base stage is skipped. Empty: the base stage trains
    ``model`` for ``steps`` steps on every domain of ``data`` first."""
    model: str = "qwen3_moe_tiny"
    """The ``configs/model`` preset of the base (an MoE family); with ``path`` the family is read from the
    checkpoint and the preset only names the runs."""
    steps: int = 300


@dataclass
class PartitionConfig:
    """How the experts are split (:func:`~connito.composition.expert_groups.partition.partition_experts`)."""

    score: str = "gate"
    """``gate`` (ESFT average gate score), ``token`` (ESFT token-selection ratio) or ``driver`` (causal driver
    score; the analysis then runs the driver scan)."""
    top_p: float = 0.2
    """Per layer, each domain picks the fewest experts whose share of the layer's score reaches top_p (ESFT)."""
    top_n: int | None = None
    """Instead of top_p: each domain picks the n best-scored experts of each layer."""
    overlap: str = "assign"
    """An expert picked by several domains: ``assign`` it to the domain where it carries the largest share, or
    ``refuse`` (the partition job fails naming the contested experts)."""
    analysis_tokens: int = 16384
    """Training tokens per domain the analysis streams."""


@dataclass
class GroupConfig:
    steps: int = 150
    """Training steps of each group job, on its domain alone."""


@dataclass
class GroupMergeConfig:
    """``merge.*``: how the group jobs' changes are merged into one model
    (:func:`~connito.composition.expert_groups.merge.merge_groups`); not ``connito merge``, which merges similar
    experts."""

    overlap: str = "refuse"
    """Two jobs changed one tensor (a router trained by both through ``train_overrides``, say): ``refuse``,
    ``average`` (elementwise mean) or ``first`` (the first domain's)."""
    max_regression: float = 0.02
    """Nats per token any domain's held-out loss may rise from base to merged model before the merge is refused."""
    validate: bool = True
    """Measure the merge before it is written and refuse it past ``max_regression``; false: write it unmeasured."""


@dataclass
class GroupsConfig:
    """Root config of ``connito groups`` (``configs/groups.yaml``)."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="groups"))
    data: DataConfig = field(default_factory=DataConfig)
    """The text every job trains on and is measured on (the recipe's domains): the base gets all of
    ``data.domains``, the analysis the groups' domains, each group job ``domains=[<its domain>]``."""
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    domains: list[str] = field(default_factory=list)
    """One group per domain, each a domain of ``data.domains``. Empty: ``data.domains``."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    merge: GroupMergeConfig = field(default_factory=GroupMergeConfig)
    train_overrides: list[str] = field(default_factory=list)
    """More trainer overrides for every training job (base, groups); quote each item on the command line:
    ``'train_overrides=["train.micro_batch_size=4","engine=zero1"]'``."""
    eval_tokens: int = 32768
    """Held-out tokens per domain and model: the merge's acceptance test, the report, each group's outcome."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rerun: str = "missing"
    """``missing``: run the jobs that are not done; ``all``: discard every job's state and start over."""
    stage: str = ""
    """Empty: plan and run the whole pipeline. ``plan``: write ``<run>/pipeline.json`` and list the jobs, run
    nothing. ``partition`` / ``merge`` / ``report``: run that stage of an existing plan in this process (what those
    jobs run)."""


def group_domains(cfg: GroupsConfig) -> list[str]:
    """The groups' domains, checked against ``data`` (``ValueError`` naming the fix)."""
    if cfg.data.source != "recipe":
        raise ValueError(
            f"data.source={cfg.data.source!r}: connito groups gives each group one domain of the bundled recipe "
            "(data.source=recipe)"
        )
    domains, known = list(cfg.domains or cfg.data.domains), list(cfg.data.domains)
    if len(domains) < 2:
        raise ValueError(
            f"domains={domains}: expert groups split the experts among at least 2 domains; to adapt to one domain "
            "use `connito adapt method=esft`"
        )
    check_domain_names("domains", domains, known)
    return domains


def _check_options(cfg: GroupsConfig) -> None:
    part, merge = cfg.partition, cfg.merge
    if part.score not in SCORES:
        raise ValueError(f"partition.score={part.score!r}: choose one of {', '.join(SCORES)}")
    if part.overlap not in PARTITION_OVERLAPS:
        raise ValueError(f"partition.overlap={part.overlap!r}: choose one of {', '.join(PARTITION_OVERLAPS)}")
    if part.top_n is not None and (isinstance(part.top_n, bool) or not isinstance(part.top_n, int) or part.top_n < 1):
        raise ValueError(f"partition.top_n={part.top_n!r}: a whole number of experts per layer >= 1, or null")
    if part.top_n is None and not 0 < part.top_p <= 1:
        raise ValueError(f"partition.top_p={part.top_p!r} is outside (0, 1] (ESFT uses 0.1 to 0.2)")
    if merge.overlap not in MERGE_OVERLAPS:
        raise ValueError(f"merge.overlap={merge.overlap!r}: choose one of {', '.join(MERGE_OVERLAPS)}")
    if not math.isfinite(merge.max_regression) or merge.max_regression < 0:
        raise ValueError(
            f"merge.max_regression={merge.max_regression!r}: a finite number of nats >= 0 (0: no domain may get "
            "worse); merge.validate=false writes the merge unmeasured"
        )
    counts = {"base.steps": cfg.base.steps, "group.steps": cfg.group.steps,
              "partition.analysis_tokens": part.analysis_tokens, "eval_tokens": cfg.eval_tokens}  # fmt: skip
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    if cfg.base.path:
        _check_moe_checkpoint(Path(cfg.base.path).expanduser(), f"base.path={cfg.base.path!r}")
    else:
        _check_moe_preset(cfg.base.model)


def _check_moe_checkpoint(path: Path, what: str) -> None:
    from connito.models.families import ModelError, get_family

    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{what} is not a checkpoint directory (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type", "")
    try:
        moe = get_family(model_type).is_moe
    except ModelError as err:
        raise ValueError(f"{what}: {err}") from None
    if not moe:
        raise ValueError(f"{what} is a dense {model_type} model: expert groups need a Mixture-of-Experts base")


def _check_moe_preset(name: str) -> None:
    from connito.models.families import get_family

    family = model_preset(name, "base.model").get("family", "")
    if not get_family(family).is_moe:
        raise ValueError(f"base.model={name!r} is a dense {family} model: expert groups need a Mixture-of-Experts base")


def base_dir(settings: dict, root: Path) -> Path:
    path = settings["base"]["path"]
    return Path(path).expanduser().resolve() if path else root / "base" / "hf"


def mask_path(root: Path, domain: str) -> Path:
    return root / "groups" / f"{domain}{MASK_SUFFIX}"


def plan_groups(cfg: GroupsConfig) -> Plan:
    """The stages of ``cfg``'s pipeline (see the module docstring)."""
    domains = group_domains(cfg)
    _check_options(cfg)
    root, ranks = run_root(cfg.run), job_ranks(cfg.launcher)
    settings = {
        "domains": domains,
        "base": asdict(cfg.base),
        "data": asdict(cfg.data),
        "train_overrides": list(cfg.train_overrides),
    }
    base = base_dir(settings, root)
    stages = []
    if not cfg.base.path:
        data = changed_overrides("data", cfg.data)
        job = train_job("base", root, [f"model={cfg.base.model}", *data], cfg.base.steps, ranks, cfg.train_overrides)
        stages.append(Stage("base", (job,)))
    analysis = root / "analysis"
    analyze = [
        "analyze",
        f"model_path={override_value(str(base))}",
        f"out_dir={override_value(str(analysis))}",
        *changed_overrides("data", cfg.data, domains=domains),
        "split=train",
        f"tokens={cfg.partition.analysis_tokens * len(domains)}",
        f"drivers.enabled={override_value(cfg.partition.score == 'driver')}",
        "sufficiency.enabled=false",
        "progress=false",
    ]
    stages.append(Stage("analyze", (Job("analyze", tuple(analyze), (str(analysis / "analysis.json"),), ranks,
                                        workdir=str(analysis)),)))  # fmt: skip
    partition = stage_job("groups", "partition", root, "partition", root / "groups" / PARTITION_FILE,
                          workdir=str(root / "groups"))  # fmt: skip
    partition = dataclasses.replace(
        partition, outputs=(*partition.outputs, *(str(mask_path(root, d)) for d in domains))
    )
    stages.append(Stage("partition", (partition,), {"partition": asdict(cfg.partition)}))
    jobs = []
    for domain in domains:
        overrides = [
            f"model={cfg.base.model}",
            f"model.path={override_value(str(base))}",
            "method=esft",
            f"esft.mask_file={override_value(str(mask_path(root, domain)))}",
            *changed_overrides("data", cfg.data, domains=[domain]),
            f"outcome.eval_domains={override_value(domains)}",
            f"outcome.eval_tokens={cfg.eval_tokens * len(domains)}",
            "outcome.save_delta=true",
        ]
        job = train_job(f"group-{domain}", root, overrides, cfg.group.steps, ranks, cfg.train_overrides, "adapt")
        delta = str(root / f"group-{domain}" / "delta" / DELTA_MANIFEST)
        jobs.append(dataclasses.replace(job, outputs=(*job.outputs, delta)))
    merge = stage_job("groups", "merge", root, "merge", root / "merged" / WEIGHTS, workdir=str(root / "merged"))
    report = stage_job("groups", "report", root, "report", root / f"{REPORT}.json")
    stages += [
        Stage("groups", tuple(jobs), {"group": asdict(cfg.group), "eval_tokens": cfg.eval_tokens}),
        Stage("merge", (merge,), {"merge": asdict(cfg.merge)}),
        Stage("report", (report,)),
    ]
    return Plan("groups", tuple(stages), settings)


def run_partition(root: Path) -> PartitionRecord:
    """The partition job: disjoint groups from the base's analysis, one mask file per domain in ``<root>/groups``
    and ``partition.json``; prints the groups and returns the ``partition.json`` record."""
    from connito.composition.expert_groups.partition import partition_from_analysis, write_group_masks

    plan = planned(root, "groups")
    require_done(root, plan, "analyze", "no group was formed")
    settings = plan.all_settings()
    part = PartitionConfig(**settings["partition"])
    analysis, base = root / "analysis", base_dir(settings, root)
    groups = partition_from_analysis(analysis, settings["domains"], part.top_p, part.top_n, score=part.score,
                                     overlap=part.overlap)  # fmt: skip
    selection = {"score": part.score, "top_p": part.top_p, "top_n": part.top_n, "overlap": part.overlap}
    paths = write_group_masks(groups, base, root / "groups", analysis=analysis, selection=selection)
    record = PartitionRecord(
        base=str(base),
        analysis=str(analysis / "analysis.json"),
        **selection,
        groups={d: {"mask_file": str(paths[d]), "experts": [list(e) for e in m.ids()]} for d, m in groups.items()},
    )
    record.save(root / "groups" / PARTITION_FILE)
    print(groups_text(groups))
    return record


def groups_text(groups: dict) -> str:
    """One line per group: its size and its experts, layer by layer."""
    lines = []
    for domain, mask in groups.items():
        by_layer: dict[int, list[int]] = {}
        for layer, expert in mask.ids():
            by_layer.setdefault(layer, []).append(expert)
        layers = "; ".join(f"layer {layer}: {experts}" for layer, experts in sorted(by_layer.items()))
        lines.append(f"group {domain}: {len(mask)} experts ({layers})")
    return "\n".join(lines)


def _validator(settings: dict, base: Path):
    from connito.composition.expert_groups.validation import held_out_validator

    merge = GroupMergeConfig(**settings["merge"])
    if not merge.validate:
        return None
    domains = settings["domains"]
    tokens = settings["eval_tokens"] * len(domains)
    data = DataConfig(**settings["data"])
    return held_out_validator(base, data, domains, eval_tokens=tokens, max_regression=merge.max_regression)


def run_merge(root: Path) -> Path:
    """The merge job: every group job done, then their deltas merged onto the base into ``<root>/merged`` (after the
    acceptance test, with ``merge.validate``)."""
    from connito.composition.expert_groups.merge import merge_groups

    plan = planned(root, "groups")
    require_done(root, plan, "groups")
    settings = plan.all_settings()
    base = base_dir(settings, root)
    packages = {domain: root / f"group-{domain}" / "delta" for domain in settings["domains"]}
    merged = merge_groups(base, packages, root / "merged", overlap=settings["merge"]["overlap"], overwrite=True,
                          validate=_validator(settings, base))  # fmt: skip
    if merged.validation:
        print(f"merge accepted (max_regression {settings['merge']['max_regression']} nats):")
        for domain in settings["domains"]:
            before, after = merged.validation["base"][domain], merged.validation["merged"][domain]
            print(f"  {domain}: base {before:.4f}, merged {after:.4f} ({after - before:+.4f})")
    return merged.out


def run_report(root: Path) -> dict:
    """The report job: held-out loss per domain of the base, each group's adapted model and the merged model;
    writes ``groups_report.json`` and ``.md`` and prints the table."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches, losses_table

    plan = planned(root, "groups")
    require_done(root, plan, "merge", "no report was written")
    settings = plan.all_settings()
    domains, base = settings["domains"], base_dir(settings, root)
    models = {"base": base}
    models.update({f"group {d}": root / f"group-{d}" / "hf" for d in domains})
    models["merged"] = root / "merged"
    held_out = held_out_batches(DataConfig(**settings["data"]), base, domains=domains,
                                eval_tokens=settings["eval_tokens"] * len(domains))  # fmt: skip
    rows = {}
    for name, path in models.items():
        rows[name] = checkpoint_losses(path, held_out)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()))
    table = losses_table(rows, [*held_out.domains, "all"])
    partition = PartitionRecord.load(root / "groups" / PARTITION_FILE)
    provenance = GroupsRecord.load(root / "merged")
    sizes = ", ".join(f"{d} {len(g['experts'])}" for d, g in partition.groups.items())
    record = {
        "schema": "connito.groups_report/1",
        "domains": held_out.domains,
        "models": {k: str(v) for k, v in models.items()},
        "validation_loss": rows,
        "groups": {d: g["experts"] for d, g in partition.groups.items()},
        "merge_validation": provenance.validation,
        "settings": settings,
    }
    atomic_write_json(root / f"{REPORT}.json", record)
    text = f"{table}\n\nExperts per group: {sizes}.\n"
    (root / f"{REPORT}.md").write_text(f"# Expert groups: held-out loss per domain (nats)\n\n{text}")
    print(text)
    return record


def failed_merge_message(root: Path, plan: Plan) -> str:
    """When the merge job failed: its error (the refusal, with the numbers), from its log; else empty."""
    job = plan.job("merge")
    status, state = current_status(root, job)
    if status != "failed" or not state.log or not Path(state.log).is_file():
        return ""
    text = Path(state.log).read_text()
    text = text[text.rfind("\n===== merge: attempt") + 1 :]  # the last attempt only
    start = text.find("connito groups: ")
    return text[start:].strip() if start >= 0 else ""
