"""``connito quickstart``: the lifecycle of an MoE model on the tiny preset and the bundled text, end to end, as a
pipeline of ``connito`` jobs: train a base, look at its routing, adapt it to one domain with ESFT, opt an expert
out, prune it for that domain, and write one ``report.md`` with the tables and pictures.

Stages (each job one ``connito`` command with its own directory under ``<run>/``):

- ``base``: ``connito train`` of ``base.model`` for ``base.steps`` steps on every domain of ``data``;
- ``analyze``: ``connito analyze`` of the base on the training text of every domain (utilisation,
  concentration, domain experts, co-activation, driver experts; ``<run>/analysis/report.md`` and its pictures);
- ``select``: ``connito select`` of the experts ``domain`` needs (ESFT-Gate, ``adapt.top_p``) from that
  analysis: ``<run>/esft.mask.json``;
- ``retire`` (two jobs at once): ``connito adapt method=esft`` of the base to ``domain`` training only the
  selected experts (``<run>/adapt/hf``, with its delta package), and ``connito prune`` of the base to
  ``prune.keep`` experts per layer by how much ``domain`` uses them (``<run>/pruned``);
- ``report``: ``connito quickstart stage=report``: held-out loss per domain of the base, the ESFT model, the base
  with ``domain``'s most-used expert of every layer opted out (an additive ``-inf`` router mask at inference; the
  same logits as ``connito remove`` of those experts), and the pruned model; ``report.md`` (with ``held_out.png``,
  ``loss_curve.png`` and the analysis' pictures) and ``report.json``.

**Decisions.** The analysis reads the training split (what ESFT selects on), the report the validation split, so
the rows that chose the experts never grade them. ESFT's experts come from that one analysis through
``connito select`` rather than from ``connito adapt``'s own selection pass: the same numbers the report shows, and
one pass less. Rerunning the command runs only the jobs that are not done (the orchestration layer); a change to a
stage's settings reruns that stage and the ones after it.

**Names.** The code is named after the command (``quickstart``: this module, :class:`QuickstartConfig`,
:func:`plan_quickstart`); what it runs is the lifecycle, and its pipeline directory stays ``runs/lifecycle``
(``run.name``): ``runs/quickstart`` is where ``connito train`` with no arguments writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connito.common.atomic import atomic_write_json
from connito.data.config import DataConfig
from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Job, Stage
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
from connito.retirement.records import PruneReport
from connito.training.config import RunConfig

log = logging.getLogger("connito.orchestration")

REPORT = "report"
MASK = "esft.mask.json"


@dataclass
class QuickstartBase:
    model: str = "qwen3_moe_tiny"
    """The ``configs/model`` preset of the base (an MoE family)."""
    steps: int = 600
    """Training steps of the base on every domain."""


@dataclass
class QuickstartAnalysis:
    tokens: int = 16384
    """Training tokens per domain the analysis streams."""
    driver_tokens: int = 4096
    """Tokens per domain of the causal driver scan."""


@dataclass
class QuickstartAdapt:
    steps: int = 150
    """ESFT steps on ``domain`` alone."""
    top_p: float = 0.2
    """ESFT-Gate: per layer, the fewest experts whose share of ``domain``'s gate score reaches top_p."""


@dataclass
class QuickstartPrune:
    keep: int = 4
    """Experts kept per MoE layer, ranked by how often ``domain``'s tokens choose them."""
    score: str = "token"
    """``token`` (token-selection ratio) or ``gate`` (average gate score)."""


@dataclass
class QuickstartOptOut:
    experts_per_layer: int = 1
    """In every MoE layer, opt out this many of ``domain``'s most-used experts (token-selection ratio)."""


@dataclass
class QuickstartConfig:
    """Root config of ``connito quickstart`` (``configs/quickstart.yaml``)."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="lifecycle"))
    data: DataConfig = field(default_factory=DataConfig)
    """The text: the base trains on every domain of ``data.domains``, the report measures every one."""
    domain: str = "code"
    """The domain the model is adapted to, opted out of and pruned for."""
    base: QuickstartBase = field(default_factory=QuickstartBase)
    analysis: QuickstartAnalysis = field(default_factory=QuickstartAnalysis)
    adapt: QuickstartAdapt = field(default_factory=QuickstartAdapt)
    prune: QuickstartPrune = field(default_factory=QuickstartPrune)
    opt_out: QuickstartOptOut = field(default_factory=QuickstartOptOut)
    train_overrides: list[str] = field(default_factory=list)
    """More trainer overrides for the base and the ESFT job; quote each item on the command line:
    ``'train_overrides=["train.micro_batch_size=4"]'``."""
    eval_tokens: int = 16384
    """Held-out tokens per domain for every model in the report."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rerun: str = "missing"
    """``missing``: run the jobs that are not done; ``all``: discard every job's state and start over."""
    stage: str = ""
    """Empty: plan and run the whole pipeline. ``plan``: write ``<run>/pipeline.json`` and list the jobs, run
    nothing. ``report``: run the report stage of an existing plan in this process (what that job runs)."""


def _check(cfg: QuickstartConfig) -> None:
    if cfg.data.source != "recipe":
        raise ValueError(
            f"data.source={cfg.data.source!r}: connito quickstart runs on the bundled recipe (data.source=recipe)"
        )
    check_domain_names("domain", [cfg.domain], list(cfg.data.domains))
    if len(cfg.data.domains) < 2:
        raise ValueError(f"data.domains={list(cfg.data.domains)}: the lifecycle compares at least 2 domains")
    counts = {"base.steps": cfg.base.steps, "adapt.steps": cfg.adapt.steps, "analysis.tokens": cfg.analysis.tokens,
              "analysis.driver_tokens": cfg.analysis.driver_tokens, "eval_tokens": cfg.eval_tokens,
              "prune.keep": cfg.prune.keep, "opt_out.experts_per_layer": cfg.opt_out.experts_per_layer}  # fmt: skip
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: a whole number >= 1")
    if not 0 < cfg.adapt.top_p <= 1:
        raise ValueError(f"adapt.top_p={cfg.adapt.top_p!r} is outside (0, 1] (ESFT uses 0.1 to 0.2)")
    if cfg.prune.score not in ("token", "gate"):
        raise ValueError(f"prune.score={cfg.prune.score!r}: choose token or gate")


def plan_quickstart(cfg: QuickstartConfig) -> Plan:
    """The stages of ``cfg``'s lifecycle (see the module docstring)."""
    _check(cfg)
    root, ranks = run_root(cfg.run), job_ranks(cfg.launcher)
    domains = list(cfg.data.domains)
    settings = {"domain": cfg.domain, "base": asdict(cfg.base), "data": asdict(cfg.data),
                "train_overrides": list(cfg.train_overrides)}  # fmt: skip
    base, analysis, mask = root / "base" / "hf", root / "analysis", root / "select" / MASK
    data = changed_overrides("data", cfg.data)
    train = train_job("base", root, [f"model={cfg.base.model}", *data], cfg.base.steps, ranks, cfg.train_overrides)
    analyze = [
        "analyze",
        f"model_path={override_value(str(base))}",
        f"out_dir={override_value(str(analysis))}",
        *data,
        "split=train",
        f"tokens={cfg.analysis.tokens * len(domains)}",
        f"drivers.tokens={cfg.analysis.driver_tokens}",
        "sufficiency.enabled=false",
        "progress=false",
    ]
    select = [
        "select",
        f"analysis_path={override_value(str(analysis))}",
        "method=gate",
        f"domains=[{cfg.domain}]",
        f"top_p={cfg.adapt.top_p}",
        f"out={override_value(str(mask))}",
    ]
    adapt = train_job("adapt", root, [
        f"model={cfg.base.model}",
        f"model.path={override_value(str(base))}",
        "method=esft",
        f"esft.mask_file={override_value(str(mask))}",
        *changed_overrides("data", cfg.data, domains=[cfg.domain]),
        f"outcome.eval_domains={override_value(domains)}",
        f"outcome.eval_tokens={cfg.eval_tokens * len(domains)}",
        "train.checkpoint_every=0",
    ], cfg.adapt.steps, ranks, cfg.train_overrides, "adapt")  # fmt: skip
    pruned = root / "pruned"
    prune = [
        "prune",
        f"checkpoint={override_value(str(base))}",
        f"analysis_path={override_value(str(analysis))}",
        f"keep={cfg.prune.keep}",
        f"score={cfg.prune.score}",
        f"domains=[{cfg.domain}]",
        f"out={override_value(str(pruned))}",
        "overwrite=true",
        "eval_tokens=0",
    ]
    report = stage_job("quickstart", "report", root, "report", root / f"{REPORT}.json")
    stages = (
        Stage("base", (train,)),
        Stage(
            "analyze",
            (Job("analyze", tuple(analyze), (str(analysis / "analysis.json"),), workdir=str(analysis)),),
            {"analysis": asdict(cfg.analysis)},
        ),  # fmt: skip
        Stage(
            "select",
            (Job("select", tuple(select), (str(mask),), workdir=str(mask.parent)),),
            {"top_p": cfg.adapt.top_p},
        ),  # fmt: skip
        Stage(
            "retire",
            (adapt, Job("prune", tuple(prune), (str(pruned / WEIGHTS),), workdir=str(pruned))),
            {"adapt": asdict(cfg.adapt), "prune": asdict(cfg.prune), "eval_tokens": cfg.eval_tokens},
        ),  # fmt: skip
        Stage("report", (report,), {"opt_out": asdict(cfg.opt_out)}),
    )
    return Plan("quickstart", stages, settings)


def most_used_experts(analysis_dir: Path, domain: str, per_layer: int) -> list[tuple[int, int]]:
    """``(layer, expert)`` of the ``per_layer`` experts ``domain``'s tokens choose most in every MoE layer
    (token-selection ratio of the analysis)."""
    from connito.analysis.expert_scores import load_analysis, score_source, score_table

    analysis = load_analysis(analysis_dir)
    score_LE = score_table(analysis, score_source("token"), domain).nan_to_num(-1.0)
    layers = analysis.model.moe_layers
    top_LK = score_LE.topk(per_layer, dim=1).indices
    return [(layers[i], int(e)) for i in range(len(layers)) for e in top_LK[i].tolist()]


def run_report(root: Path) -> dict:
    """The report job: held-out loss per domain of every model of the lifecycle, ``report.md`` / ``.json`` and the
    pictures in ``root``; prints the table."""
    from connito.analysis.held_out import held_out_batches, load_checkpoint, losses_table
    from connito.experts.mask_file import MaskFile
    from connito.routing.opt_out import OptOut

    plan = planned(root, "quickstart")
    require_done(root, plan, "retire", "no report was written")
    settings = plan.all_settings()
    domain, data = settings["domain"], DataConfig(**settings["data"])
    base = root / "base" / "hf"
    per_layer = settings["opt_out"]["experts_per_layer"]
    opted_out = most_used_experts(root / "analysis", domain, per_layer)
    held_out = held_out_batches(data, base, eval_tokens=settings["eval_tokens"] * len(data.domains))
    keep, esft = settings["prune"]["keep"], MaskFile.load(root / "select" / MASK)
    names = {
        "base": "base",
        "esft": f"ESFT on {domain}",
        "opt_out": f"base, {domain}'s top {per_layer} expert(s)/layer opted out",
        "pruned": f"pruned to {keep}/layer for {domain}",
    }
    rows = {}
    base_model = load_checkpoint(base)
    rows[names["base"]] = held_out.losses(base_model)
    with OptOut(base_model, opted_out):
        rows[names["opt_out"]] = held_out.losses(base_model)
    rows[names["esft"]] = held_out.losses(load_checkpoint(root / "adapt" / "hf"))
    rows[names["pruned"]] = held_out.losses(load_checkpoint(root / "pruned"))
    columns = [*held_out.domains, "all"]
    for name, losses in rows.items():
        log.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    _plot_losses(rows, columns, root / "held_out.png")
    _plot_curve(root / "base" / "metrics.jsonl", root / "loss_curve.png")
    record = {
        "schema": "connito.lifecycle_report/1",
        "domain": domain,
        "domains": held_out.domains,
        "validation_loss": rows,
        "opted_out": [list(e) for e in opted_out],
        "esft_experts": esft.mask.to_dict()["experts"],
        "pruned_kept": PruneReport.load(root / "pruned" / PruneReport.FILE).kept,
        "settings": settings,
    }
    atomic_write_json(root / f"{REPORT}.json", record, end="\n")
    (root / f"{REPORT}.md").write_text(_markdown(root, settings, rows, columns, record))
    print(losses_table(rows, columns))
    return record


def _markdown(root: Path, settings: dict, rows: dict, columns: list[str], record: dict) -> str:
    from connito.adaptation.outcome import AdaptOutcome
    from connito.analysis.held_out import losses_table
    from connito.analysis.record import AnalysisRecord

    domain, keep = settings["domain"], settings["prune"]["keep"]
    adapt = AdaptOutcome.load(root / "adapt")
    base_val = _last_eval(root / "base" / "metrics.jsonl")
    trained = adapt.trainable_params / adapt.total_params
    analysis = AnalysisRecord.load(root / "analysis").model
    lines = [
        "# The lifecycle of an MoE model, end to end",
        "",
        f"A tiny {analysis.model_type} ({len(analysis.moe_layers)} MoE layers of {analysis.num_experts} "
        f"experts, top-{analysis.top_k}) trained on {', '.join(record['domains'])}, then looked at, adapted to "
        f"{domain}, an expert opted out and the model pruned for {domain}. Every number is held-out loss in nats "
        "per token on the validation split (lower is better); the jobs' logs are in `logs/`.",
        "",
        "## 1. Train",
        "",
        f"`connito train` for {settings['base']['steps']} steps (`base/`); the trainer's own validation at the end "
        "(on its own sample of the validation split): " + ", ".join(f"{k} {v:.3f}" for k, v in base_val.items()) + ".",
        "",
        "![training loss](loss_curve.png)",
        "",
        "## 2. Look",
        "",
        "`connito analyze` on the training text (`analysis/report.md` has every table): how many experts carry each "
        "domain's gate mass, which experts each domain chooses, which pairs fire together, and which experts a "
        "domain's loss depends on (driver experts, found by scaling each expert's routing weight).",
        "",
        "![utilisation](analysis/utilisation.png)",
        "",
        "![drivers](analysis/drivers.png)",
        "",
        "## 3. Adapt, opt out, prune",
        "",
        f"- **ESFT on {domain}** (`connito select` + `connito adapt method=esft`, `adapt/`): the experts {domain} "
        f"uses (ESFT-Gate, top_p {settings['adapt']['top_p']}: {_experts_per_layer(record['esft_experts'])}) "
        f"trained alone for {settings['adapt']['steps']} steps, {trained:.1%} of the parameters; every other "
        "weight bit-identical to the base.",
        f"- **Opt-out**: the base with {domain}'s most-used expert of every layer ({_experts(record['opted_out'])}) "
        "masked out of routing at inference (`connito remove` cuts the same experts out of the checkpoint with the "
        "same logits).",
        f"- **Pruned** (`connito prune`, `pruned/`): the {keep} experts per layer {domain} uses most kept, the rest "
        "removed; a smaller checkpoint plain transformers loads.",
        "",
        losses_table(rows, columns),
        "",
        _reading(rows, domain, record["domains"]),
        "",
        "![held-out loss](held_out.png)",
        "",
    ]
    return "\n".join(lines)


def _reading(rows: dict[str, dict[str, float]], domain: str, domains: list[str]) -> str:
    """One sentence per model: what it did to ``domain`` and, at most, to the other domains (against the base)."""
    base, others = next(iter(rows.values())), [d for d in domains if d != domain]
    sentences = []
    for name, losses in list(rows.items())[1:]:
        own = losses[domain] - base[domain]
        worst = max(others, key=lambda d: losses[d] - base[d])
        sentences.append(
            f"{name}: {domain} {own:+.3f} nats, the other domains at most {losses[worst] - base[worst]:+.3f} ({worst})."
        )
    return "Against the base: " + " ".join(sentences)


def _experts_per_layer(experts: dict[str, list[int]]) -> str:
    return "; ".join(f"layer {layer}: {', '.join(map(str, ids))}" for layer, ids in experts.items())


def _experts(ids: list[list[int]]) -> str:
    return ", ".join(f"layer {layer}: {expert}" for layer, expert in ids)


def _last_eval(metrics: Path) -> dict[str, float]:
    last = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if any(k.startswith("val/") for k in record):
            last = {k.removeprefix("val/"): v for k, v in record.items() if k.startswith("val/")}
    return last


def _plot_losses(rows: dict, columns: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, (name, losses) in enumerate(rows.items()):
        ax.bar([c + i * width for c in range(len(columns))], [losses[c] for c in columns], width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], columns)
    low = min(min(losses[c] for c in columns) for losses in rows.values())
    ax.set_ylim(bottom=max(0.0, low - 0.5))
    ax.set_ylabel("held-out loss (nats)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_curve(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    val = [(r["step"], r["val/all"]) for r in records if "val/all" in r]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation (all domains)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
