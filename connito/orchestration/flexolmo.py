"""``connito flexolmo``: FlexOLMo (Shi et al. 2025) as a pipeline of independent jobs.

Stages (each a set of jobs, each job one ``connito`` command with its own directory under ``<run>/``):

- ``public`` (only without ``public.path``): ``connito train`` of the dense ``public.model`` on the public data
  (``public.domains``);
- ``prepare``: one ``prepare-<owner>`` job per owner, ``connito flexolmo stage=prepare owner_name=<owner>``: the
  two-expert start :func:`~connito.composition.flexolmo.owner_start` writes (expert 0 the public FFN, expert 1 a
  copy of it) into ``start-<owner>/``, with ``owner_mask.json`` (a bare ExpertMask: expert 1 of every MoE layer);
- ``owners``: one ``owner-<owner>`` job per owner, ``connito train`` from its start on its domain alone, expert 1
  and router row 1 trainable (``callbacks.trainable`` with the mask and ``router_rows=true``): the public FFN, the
  public router row, attention, embeddings and norms stay bit-identical;
- ``merge``: ``connito flexolmo stage=merge``, :func:`~connito.composition.flexolmo.merge_owners` into ``merged/``
  (public FFN = expert 0, owner i = expert i, in ``owners`` order);
- ``report``: ``connito flexolmo stage=report``, held-out loss per domain (public domains, then the owners') of the
  public model, each owner's model, the merged model, and the merged model with each owner opted out in turn
  (:class:`~connito.routing.opt_out.OptOut`, no retraining): ``flexolmo_report.md`` / ``.json``.

On a finished pipeline, two stages run alone for a user: ``stage=evaluate opt_out=[code]`` prints the held-out
table of the merged model with those owners opted out (beside the merged model with every expert in), and
``stage=remove opt_out=[code] out=DIR`` writes the merged checkpoint without their experts (FFN and router rows
gone; :func:`~connito.routing.opt_out.save_without_experts`), which plain transformers loads and which computes
what the merged model computes under the opt-out.

**Decisions.** Each owner is one domain of ``data`` (the bundled recipe's) and trains on it alone; the public data
is ``public.domains``, and an owner cannot be one of them. The public model's tokenizer is the one trained on the
public data (or ``public.path``'s): owners keep it, as FlexOLMo's owners keep the public model's. Router rows
(``owner.router_init``): ``mean_hidden`` sets row 0 to the public model's mean FFN input on the public domains'
training text and row 1 to that on the owner's (:func:`~connito.composition.hidden_means.mean_ffn_inputs`);
FlexOLMo embeds each domain with an external embedder (GritLM) instead, which it measured better (46.7 vs 43.5
average); ``random`` draws them (the public row from one seed for every owner, owner i's row from seed i + 1).
Owners train with ``model.aux_loss_coef=0`` (top-2 of 2: the load-balancing loss is a constant).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connito.common.atomic import atomic_write_json
from connito.data.config import DataConfig
from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Stage
from connito.orchestration.overrides import changed_overrides, override_value
from connito.orchestration.plan import Plan
from connito.orchestration.recipe import (
    WEIGHTS,
    check_domain_names,
    job_ranks,
    mean_hidden_rows,
    planned,
    require_done,
    run_root,
    stage_job,
    train_job,
)
from connito.training.config import RunConfig

log = logging.getLogger("connito.orchestration")

ROUTER_INITS = ("mean_hidden", "random")
MASK_FILE = "owner_mask.json"
REPORT = "flexolmo_report"


@dataclass
class PublicConfig:
    path: str = ""
    """An existing dense checkpoint directory (llama or qwen3): the public model; the public stage is skipped.
    Empty: the public stage trains ``model`` for ``steps`` steps on ``domains``."""
    model: str = "llama_tiny"
    """Without ``path``: the ``configs/model`` preset of the dense public model (llama_tiny, qwen3_tiny)."""
    steps: int = 300
    domains: list[str] = field(default_factory=lambda: ["prose", "wiki"])
    """The public data: domains of ``data`` (the public model's training text, router row 0's text, and columns
    of the report)."""


@dataclass
class OwnerConfig:
    steps: int = 150
    """Training steps of each owner, on its domain alone."""
    router_init: str = "mean_hidden"
    """Router rows (public, owner) of each owner's start: ``mean_hidden`` (row 0: the public model's mean FFN input
    on the public domains' training text, row 1: on the owner's) or ``random``."""
    router_tokens: int = 32768
    """router_init=mean_hidden: training tokens per domain the means are taken over."""


@dataclass
class FlexOlmoConfig:
    """Root config of ``connito flexolmo`` (``configs/flexolmo.yaml``)."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="flexolmo"))
    data: DataConfig = field(default_factory=DataConfig)
    """The text every job trains on and is measured on (the recipe's domains): the public model gets
    ``domains=public.domains``, each owner ``domains=[<owner>]``."""
    public: PublicConfig = field(default_factory=PublicConfig)
    owners: list[str] = field(default_factory=lambda: ["code", "docs"])
    """One data owner per name, each a domain of ``data`` that is not public; owner i is expert i of the merge."""
    owner: OwnerConfig = field(default_factory=OwnerConfig)
    top_k: int = 2
    """Experts per token of the merged model (at most 1 + the number of owners)."""
    opt_out: list[str] = field(default_factory=list)
    """stage=evaluate / stage=remove: the owners to opt out of the merged model."""
    out: str = ""
    """stage=remove: the directory the checkpoint without ``opt_out``'s experts is written to."""
    train_overrides: list[str] = field(default_factory=list)
    """More ``connito train`` overrides for every training job (public, owners); quote each item on the command
    line: ``'train_overrides=["train.micro_batch_size=4","engine=zero1"]'``."""
    eval_tokens: int = 32768
    """Held-out tokens per domain and model in the report (and stage=evaluate)."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rerun: str = "missing"
    """``missing``: run the jobs that are not done; ``all``: discard every job's state and start over."""
    stage: str = ""
    """Empty: plan and run the whole pipeline. ``evaluate`` and ``remove``: run on a finished pipeline (see the
    module docstring). Internal (what the jobs run): ``prepare`` (with ``owner_name``), ``merge``, ``report``."""
    owner_name: str = ""
    """Internal, stage=prepare: the owner whose start the job writes (``owner`` is the owners' training group)."""


def check_domains(cfg: FlexOlmoConfig) -> list[str]:
    """The owners, checked against ``data`` and the public domains (``ValueError`` naming the fix)."""
    if cfg.data.source != "recipe":
        raise ValueError(
            f"data.source={cfg.data.source!r}: connito flexolmo gives each owner one domain of the bundled recipe "
            "(data.source=recipe)"
        )
    known, public, owners = list(cfg.data.domains), list(cfg.public.domains), list(cfg.owners)
    if not owners:
        raise ValueError(f"owners=[]: FlexOLMo needs at least 1 data owner, a domain of data.domains ({known})")
    if not public:
        raise ValueError("public.domains=[]: name the public data (domains of data.domains), e.g. [prose,wiki]")
    check_domain_names("owners", owners, known)
    check_domain_names("public.domains", public, known)
    both = [name for name in owners if name in public]
    if both:
        raise ValueError(
            f"owner(s) {', '.join(map(repr, both))} also in public.domains={public}: an owner's data is its own, "
            "never the public model's; drop it from one of the lists"
        )
    return owners


def start_dir(root: Path, owner: str) -> Path:
    return root / f"start-{owner}"


def public_dir(settings: dict, root: Path) -> Path:
    path = settings["public"]["path"]
    return Path(path).expanduser().resolve() if path else root / "public" / "hf"


def plan_flexolmo(cfg: FlexOlmoConfig) -> Plan:
    """The stages of ``cfg``'s pipeline (see the module docstring)."""
    owners = check_domains(cfg)
    if cfg.owner.router_init not in ROUTER_INITS:
        raise ValueError(f"owner.router_init={cfg.owner.router_init!r}: choose one of {', '.join(ROUTER_INITS)}")
    if not 1 <= cfg.top_k <= 1 + len(owners):
        raise ValueError(
            f"top_k={cfg.top_k}: the merged model has 1 + {len(owners)} experts (the public one and one per owner); "
            f"choose 1 to {1 + len(owners)}"
        )
    if cfg.opt_out or cfg.out:
        raise ValueError(
            "opt_out and out are for a finished pipeline: stage=evaluate opt_out=[...] (a held-out table) or "
            "stage=remove opt_out=[...] out=DIR (a checkpoint without those experts); the pipeline's report opts "
            "each owner out in turn"
        )
    if cfg.public.path and not (Path(cfg.public.path).expanduser() / "config.json").is_file():
        raise ValueError(f"public.path={cfg.public.path!r} is not a checkpoint directory (no config.json)")
    root, ranks = run_root(cfg.run), job_ranks(cfg.launcher)
    stages = []
    if not cfg.public.path:
        data = changed_overrides("data", cfg.data, domains=list(cfg.public.domains))
        public = train_job("public", root, [f"model={cfg.public.model}", *data], cfg.public.steps, ranks,
                           cfg.train_overrides)  # fmt: skip
        stages.append(Stage("public", (public,)))
    prepare, train = [], []
    for owner in owners:
        start = start_dir(root, owner)
        prepare.append(stage_job("flexolmo", f"prepare-{owner}", root, "prepare", start / MASK_FILE,
                                 f"owner_name={override_value(owner)}", workdir=str(start)))  # fmt: skip
        overrides = [
            f"model.path={override_value(str(start))}",
            f"model.name=flexolmo-{owner}",
            "model.aux_loss_coef=0",
            *changed_overrides("data", cfg.data, domains=[owner]),
            f"+callbacks.trainable.mask_file={override_value(str(start / MASK_FILE))}",
            "+callbacks.trainable.router_rows=true",
        ]
        train.append(train_job(f"owner-{owner}", root, overrides, cfg.owner.steps, ranks, cfg.train_overrides))
    merge = stage_job("flexolmo", "merge", root, "merge", root / "merged" / WEIGHTS, workdir=str(root / "merged"))
    report = stage_job("flexolmo", "report", root, "report", root / f"{REPORT}.json")
    stages += [
        Stage("prepare", tuple(prepare), {"owner": asdict(cfg.owner)}),
        Stage("owners", tuple(train)),
        Stage("merge", (merge,), {"top_k": cfg.top_k}),
        Stage("report", (report,), {"eval_tokens": cfg.eval_tokens}),
    ]
    settings = {
        "owners": owners,
        "public": asdict(cfg.public),
        "data": asdict(cfg.data),
        "train_overrides": list(cfg.train_overrides),
    }
    return Plan("flexolmo", tuple(stages), settings)


def _has_stage(plan: Plan, name: str) -> bool:
    return any(stage.name == name for stage in plan.stages)


def run_prepare(root: Path, owner: str) -> Path:
    """A prepare job: ``owner``'s two-expert start in ``<root>/start-<owner>`` and its ``owner_mask.json``."""
    from connito.composition.flexolmo import owner_start

    plan = planned(root, "flexolmo")
    settings = plan.all_settings()
    owners = settings["owners"]
    if owner not in owners:
        raise ValueError(f"owner_name={owner!r}: not an owner of {root}; its owners: {', '.join(owners)}")
    if _has_stage(plan, "public"):
        require_done(root, plan, "public", "no owner start was written")
    public = public_dir(settings, root)
    config = OwnerConfig(**settings["owner"])
    rows = None
    if config.router_init == "mean_hidden":
        domain_sets = [list(settings["public"]["domains"]), [owner]]  # row 0: public text, row 1: the owner's
        rows = mean_hidden_rows(public, DataConfig(**settings["data"]), domain_sets, config.router_tokens)
    start = owner_start(public, start_dir(root, owner), router_rows=rows, seed=owners.index(owner) + 1,
                        overwrite=True)  # fmt: skip
    (start / MASK_FILE).write_text(owner_mask(start).to_json(indent=1) + "\n")
    return start


def owner_mask(start: Path):
    """The ExpertMask an owner trains: expert 1 of every MoE layer of the checkpoint at ``start`` (read from its
    config; the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from connito.experts import ExpertMask, ExpertView

    config = AutoConfig.from_pretrained(start, local_files_only=True)
    with torch.device("meta"):
        view = ExpertView(AutoModelForCausalLM.from_config(config))
    ids = [(layer, 1) for layer in view.moe_layers]
    return ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers)


def run_merge(root: Path) -> Path:
    """The merge job: every owner done, then their experts merged against the public model into
    ``<root>/merged``."""
    from connito.composition.flexolmo import merge_owners

    plan = planned(root, "flexolmo")
    require_done(root, plan, "owners")
    settings = plan.all_settings()
    owners = {owner: root / f"owner-{owner}" / "hf" for owner in settings["owners"]}
    return merge_owners(public_dir(settings, root), owners, root / "merged", top_k=settings["top_k"], overwrite=True)


def _held_out(root: Path, settings: dict):
    from connito.analysis.held_out import held_out_batches

    domains = [*settings["public"]["domains"], *settings["owners"]]
    return held_out_batches(DataConfig(**settings["data"]), public_dir(settings, root), domains=domains,
                            eval_tokens=settings["eval_tokens"] * len(domains))  # fmt: skip


def _opted_out_losses(model, merged: Path, names: list[str], held_out) -> dict[str, float]:
    from connito.composition.flexolmo import owner_experts
    from connito.routing.opt_out import OptOut, in_every_layer

    with OptOut(model, in_every_layer(*owner_experts(merged, names))):
        return held_out.losses(model)


def _finished(root: Path, opt_out: list[str]) -> tuple[dict, list[str]]:
    """A finished pipeline's settings and ``opt_out`` checked against its owners."""
    plan = planned(root, "flexolmo")
    owners = plan.settings["owners"]
    unknown = [name for name in opt_out if name not in owners]
    if unknown:
        raise ValueError(f"opt_out: unknown owner(s) {', '.join(map(repr, unknown))}; the owners: {', '.join(owners)}")
    if len(set(opt_out)) != len(opt_out):
        raise ValueError(f"opt_out={list(opt_out)}: name each owner once")
    require_done(root, plan, "merge", "there is no merged model yet")
    return plan.all_settings(), list(opt_out)


def run_report(root: Path) -> dict:
    """The report job: held-out loss per domain of the public model, each owner, the merged model and the merged
    model with each owner opted out in turn; writes ``flexolmo_report.json`` and ``.md`` and prints the table."""
    from connito.analysis.held_out import checkpoint_losses, load_checkpoint, losses_table
    from connito.routing.opt_out import OptOutError

    settings, _ = _finished(root, [])
    held_out = _held_out(root, settings)
    models = {"public": public_dir(settings, root)}
    models.update({f"owner {owner}": root / f"owner-{owner}" / "hf" for owner in settings["owners"]})
    rows = {name: checkpoint_losses(path, held_out) for name, path in models.items()}
    merged = root / "merged"
    model = load_checkpoint(merged)
    rows["merged"] = held_out.losses(model)
    refused = {}
    for owner in settings["owners"]:
        try:
            rows[f"merged, {owner} opted out"] = _opted_out_losses(model, merged, [owner], held_out)
        except OptOutError as err:  # one owner at top_k=2: a single expert would be left
            refused[owner] = str(err)
            log.warning("opting out %s: %s", owner, err)
    columns = [*settings["public"]["domains"], *settings["owners"], "all"]
    change = {
        name.removeprefix("merged, ").removesuffix(" opted out"): {
            c: 100 * (losses[c] / rows["merged"][c] - 1) for c in columns
        }
        for name, losses in rows.items()
        if name.endswith(" opted out")
    }
    table = losses_table(rows, columns)
    change_table = _percent_table(change, columns)
    record = {
        "schema": "connito.flexolmo_report/1",
        "domains": held_out.domains,
        "models": {**{k: str(v) for k, v in models.items()}, "merged": str(merged)},
        "validation_loss": rows,
        "opt_out_change_percent": change,
        "opt_out_refused": refused,
        "settings": settings,
    }
    atomic_write_json(root / f"{REPORT}.json", record)
    text = f"{table}\n\nOpting an owner out: change of held-out loss vs the merged model (%)\n\n{change_table}\n"
    (root / f"{REPORT}.md").write_text(f"# FlexOLMo: held-out loss per domain (nats)\n\n{text}")
    print(text)
    return record


def _percent_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    lines = ["| opted out | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:+.2f}" if row[c] == row[c] else "n/a" for c in columns]  # n/a: no held-out tokens
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_evaluate(root: Path, opt_out: list[str]) -> dict[str, dict[str, float]]:
    """stage=evaluate: held-out loss per domain of the merged model with every expert in and with ``opt_out``'s
    experts opted out (no retraining); prints the table and returns its rows."""
    from connito.analysis.held_out import load_checkpoint, losses_table

    settings, names = _finished(root, opt_out)
    held_out = _held_out(root, settings)
    merged = root / "merged"
    model = load_checkpoint(merged)
    rows = {"merged": held_out.losses(model)}
    if names:
        rows[f"merged, {', '.join(names)} opted out"] = _opted_out_losses(model, merged, names, held_out)
    print(losses_table(rows, [*settings["public"]["domains"], *settings["owners"], "all"]))
    return rows


def run_remove(root: Path, opt_out: list[str], out: str) -> Path:
    """stage=remove: the merged checkpoint without ``opt_out``'s experts (FFNs and router rows), written to
    ``out``."""
    from connito.composition.flexolmo import owner_experts
    from connito.routing.opt_out import in_every_layer, save_without_experts

    if not out:
        raise ValueError("stage=remove writes a new checkpoint: give its directory, out=DIR")
    if not opt_out:
        raise ValueError("stage=remove: name the owners whose experts to remove, opt_out=[...]")
    _, names = _finished(root, opt_out)
    merged = root / "merged"
    experts = in_every_layer(*owner_experts(merged, names))
    return save_without_experts(merged, experts, Path(out).expanduser().resolve())
