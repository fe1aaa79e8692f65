"""``connito federated``: FFT-MoE (Hu et al. 2025) as a pipeline of independent jobs, round after round.

Stages (each a set of jobs, each job one ``connito`` command with its own directory under ``<run>/``):

- ``base`` (only without ``base.path``): ``connito train`` of ``base.model`` on ``base.domains``: the frozen base;
- ``init``: ``connito federated stage=init``: the round-0 global adapters (``round-000/global.safetensors``, drawn
  from ``adapter.seed``, every up-projection zero) and each client's start (the same for all at round 0);
- per round r, ``round-r``: one ``r<r>-<client>`` job per client, ``connito train`` from the base on the client's
  domain alone with ``callbacks.fft_moe`` (its budget ``top_k``, its start as ``init``), which writes the client's
  update (a delta package of its adapters + ``update.json``) into ``r<r>-<client>/update``; then ``aggregate-r``:
  ``connito federated stage=aggregate round_index=r``, :func:`~connito.composition.fft_moe.server.aggregate_round`
  (updates refused before aggregation name their client; ``skip_refused`` lets the round go on without them), which
  writes ``round-<r+1>/global.safetensors``, each client's start (global experts + its own router) and
  ``round-<r+1>/aggregation.json`` (accepted, refused, contributors per expert, bytes uploaded per client);
- ``export``: ``connito federated stage=export``: per client a checkpoint transformers loads (base + the last
  global experts + its own router, :func:`~connito.composition.fft_moe.export.export_client`) and its adapters
  alone as a package, under ``export/<client>/``; the report ``federated_report.md`` / ``.json``: held-out loss on
  each client's domain of the base and of each client's model, and the bytes each client uploaded per round.

Rerunning the command runs only the jobs that are not done: a killed client job is rerun alone (it resumes from its
last checkpoint), and a round's aggregation waits for every client of that round.

**Decisions.** Each client is one domain of ``data`` (non-IID by construction) with a budget (``budgets[i]``: the
experts it routes each token to; every client may route to all M experts, the budget bounds how many at once).
|D_n| is the number of training rows of the client's domain. An expert counts as trained by a client in a round
when the client routed it at least one token (``tokens_per_expert`` of its update). Base routers of an MoE base stay
frozen, so clients run with ``model.aux_loss_coef=0``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from connito.common.atomic import atomic_write_json
from connito.common.records import JsonRecord
from connito.data.config import DataConfig
from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Stage
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

GLOBAL = "global.safetensors"
REPORT = "federated_report"
AGGREGATION = "aggregation.json"
UPDATE = "update"


@dataclass(frozen=True, kw_only=True)
class AggregationRecord(JsonRecord):
    """``round-<r+1>/aggregation.json``: round r's accepted and refused clients (``refused``: client -> reason),
    the clients that trained each adapter expert (``contributors``: ``"<layer>.<expert>"`` -> clients) and the bytes
    each client uploaded."""

    SCHEMA: ClassVar[str] = "connito.fft_moe.aggregation/1"
    INDENT: ClassVar[int | None] = 1
    END: ClassVar[str] = ""
    WHAT: ClassVar[str] = "FFT-MoE aggregation record"
    FIX: ClassVar[str] = "run the round's aggregation again (`connito federated` with the same settings)"

    round: int
    local_only: bool
    accepted: list[str]
    refused: Mapping[str, str]
    contributors: Mapping[str, list[str]]
    bytes_uploaded: Mapping[str, int]


@dataclass
class BaseModelConfig:
    """The frozen base model the clients' adapters sit on (``base.*``): an existing checkpoint or a preset to train."""

    path: str = ""
    """An existing checkpoint directory (dense or MoE, with its tokenizer): the frozen base; no base stage."""
    model: str = "llama_tiny"
    """Without ``path``: the ``configs/model`` preset the base stage trains."""
    steps: int = 300
    domains: list[str] = field(default_factory=lambda: ["prose", "wiki"])
    """Without ``path``: the base's training text (domains of ``data``)."""


@dataclass
class AdapterOptions:
    num_experts: int = 8
    width: int = 16
    activation: str = "gelu"
    layers: list[int] | None = None
    """Decoder layers with an adapter; null: every layer."""
    aux_loss_coef: float = 0.01
    """Weight of the budget-normalised balance loss (:mod:`connito.composition.fft_moe.balance`)."""
    seed: int = 0
    """Seed of the round-0 global adapters (routers and down-projections; every up-projection is zero)."""


@dataclass
class FederatedConfig:
    """Root config of ``connito federated`` (``configs/federated.yaml``)."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="federated"))
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    clients: list[str] = field(default_factory=lambda: ["code", "docs"])
    """One client per name, each a domain of ``data`` (its private data)."""
    budgets: list[int] = field(default_factory=lambda: [1, 2])
    """Experts per token of each client (``clients[i]`` routes to ``budgets[i]``), 1 to ``adapter.num_experts``."""
    adapter: AdapterOptions = field(default_factory=AdapterOptions)
    rounds: int = 2
    client_steps: int = 50
    """Local training steps of each client in each round."""
    skip_refused: bool = False
    """A refused update (damaged package, another base, non-finite values): false stops the round; true aggregates
    without that client (the refusal is recorded in the round's aggregation.json)."""
    local_only: bool = False
    """The baseline without federation: the same jobs, but each client's next start is its own update (experts and
    router), nothing averaged across clients (updates are still checked)."""
    train_overrides: list[str] = field(default_factory=list)
    """More ``connito train`` overrides for every training job (base, clients)."""
    eval_tokens: int = 32768
    """Held-out tokens per domain and model in the report."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rerun: str = "missing"
    stage: str = ""
    """Empty: plan and run the pipeline. Internal (what the jobs run): ``init``, ``aggregate`` (with
    ``round_index``)."""
    round_index: int = -1
    """Internal, stage=aggregate: the round whose updates the job aggregates."""


def check_clients(cfg: FederatedConfig) -> list[str]:
    if cfg.data.source != "recipe":
        raise ValueError(
            f"data.source={cfg.data.source!r}: each client is one domain of the recipe (data.source=recipe)"
        )
    clients = list(cfg.clients)
    if not clients:
        raise ValueError(f"clients=[]: name at least one client, a domain of data.domains ({list(cfg.data.domains)})")
    check_domain_names("clients", clients, list(cfg.data.domains))
    if len(cfg.budgets) != len(clients):
        raise ValueError(
            f"budgets={list(cfg.budgets)} has {len(cfg.budgets)} entries for {len(clients)} clients {clients}: give "
            "one budget (experts per token) per client"
        )
    bad = [b for b in cfg.budgets if not 1 <= b <= cfg.adapter.num_experts]
    if bad:
        raise ValueError(f"budgets {bad} are not between 1 and adapter.num_experts={cfg.adapter.num_experts}")
    if not cfg.base.path:
        check_domain_names("base.domains", list(cfg.base.domains), list(cfg.data.domains))
    elif not (Path(cfg.base.path).expanduser() / "config.json").is_file():
        raise ValueError(f"base.path={cfg.base.path!r} is not a checkpoint directory (no config.json)")
    if cfg.rounds < 1:
        raise ValueError(f"rounds={cfg.rounds}: run at least 1 round")
    return clients


def round_dir(root: Path, index: int) -> Path:
    return root / f"round-{index:03d}"


def start_file(root: Path, index: int, client: str) -> Path:
    return round_dir(root, index) / f"start-{client}.safetensors"


def base_dir(settings: dict, root: Path) -> Path:
    path = settings["base"]["path"]
    return Path(path).expanduser().resolve() if path else root / "base" / "hf"


def client_job(cfg: FederatedConfig, root: Path, index: int, client: str, budget: int, ranks: int):
    name = f"r{index}-{client}"
    adapter = cfg.adapter
    overrides = [
        f"model.path={override_value(str(base_dir(asdict(cfg), root)))}",
        f"model.name=fft-moe-{client}",
        "model.aux_loss_coef=0",
        *changed_overrides("data", cfg.data, domains=[client]),
        f"+callbacks.fft_moe.top_k={budget}",
        f"+callbacks.fft_moe.num_experts={adapter.num_experts}",
        f"+callbacks.fft_moe.width={adapter.width}",
        f"+callbacks.fft_moe.activation={override_value(adapter.activation)}",
        f"+callbacks.fft_moe.layers={override_value(adapter.layers)}",
        f"+callbacks.fft_moe.aux_loss_coef={adapter.aux_loss_coef!r}",
        f"+callbacks.fft_moe.init={override_value(str(start_file(root, index, client)))}",
        f"+callbacks.fft_moe.client={override_value(client)}",
        f"+callbacks.fft_moe.update={override_value(str(root / name / UPDATE))}",
    ]
    job = train_job(name, root, overrides, cfg.client_steps, ranks, cfg.train_overrides)
    return replace(job, outputs=(str(root / name / UPDATE / "update.json"),))


def plan_federated(cfg: FederatedConfig) -> Plan:
    """The stages of ``cfg``'s pipeline (see the module docstring)."""
    clients = check_clients(cfg)
    root, ranks = run_root(cfg.run), job_ranks(cfg.launcher)
    stages = []
    if not cfg.base.path:
        data = changed_overrides("data", cfg.data, domains=list(cfg.base.domains))
        base = train_job("base", root, [f"model={cfg.base.model}", *data], cfg.base.steps, ranks, cfg.train_overrides)
        stages.append(Stage("base", (base,)))
    init = stage_job("federated", "init", root, "init", round_dir(root, 0) / GLOBAL, workdir=str(round_dir(root, 0)))
    stages.append(Stage("init", (init,), {"adapter": asdict(cfg.adapter)}))
    aggregation = {"skip_refused": cfg.skip_refused, "local_only": cfg.local_only}
    for index in range(cfg.rounds):
        jobs = tuple(client_job(cfg, root, index, c, b, ranks) for c, b in zip(clients, cfg.budgets, strict=True))
        stages.append(Stage(f"round-{index}", jobs))
        aggregate = stage_job("federated", f"aggregate-{index}", root, "aggregate", round_dir(root, index + 1) / GLOBAL,
                              f"round_index={index}", workdir=str(round_dir(root, index + 1)))  # fmt: skip
        stages.append(Stage(f"aggregate-{index}", (aggregate,), aggregation if index == 0 else {}))
    export = stage_job("federated", "export", root, "export", root / f"{REPORT}.json", workdir=str(root / "export"))
    stages.append(Stage("export", (export,), {"eval_tokens": cfg.eval_tokens, "rounds": cfg.rounds}))
    settings = {
        "clients": clients,
        "budgets": list(cfg.budgets),
        "base": asdict(cfg.base),
        "data": asdict(cfg.data),
        "train_overrides": list(cfg.train_overrides),
    }
    return Plan("federated", tuple(stages), settings)


def _has_stage(plan: Plan, name: str) -> bool:
    return any(stage.name == name for stage in plan.stages)


def run_init(root: Path) -> Path:
    """The init job: the round-0 global adapters on the base and every client's start (the same tensors)."""
    import torch
    from safetensors.torch import save_file

    from connito.analysis.held_out import load_checkpoint
    from connito.composition.fft_moe import AdapterSpec, adapter_state, install_adapters

    plan = planned(root, "federated")
    settings = plan.all_settings()
    if _has_stage(plan, "base"):
        require_done(root, plan, "base", "no adapters were drawn")
    options = AdapterOptions(**settings["adapter"])
    spec = AdapterSpec(options.num_experts, options.width, options.activation,
                       None if options.layers is None else tuple(options.layers))  # fmt: skip
    model = load_checkpoint(base_dir(settings, root))
    torch.manual_seed(options.seed)
    install_adapters(model, spec, top_k=1)  # the budget is not a tensor: one set of adapters serves every budget
    tensors = {n: t.contiguous() for n, t in adapter_state(model).items()}
    out = round_dir(root, 0)
    out.mkdir(parents=True, exist_ok=True)
    for client in settings["clients"]:
        save_file(tensors, str(start_file(root, 0, client)))
    save_file(tensors, str(out / GLOBAL))  # last: the job's output says the round is ready
    return out / GLOBAL


def run_aggregate(root: Path, index: int) -> AggregationRecord:
    """The aggregation job of round ``index``: accept the clients' updates, aggregate, write round ``index + 1``."""
    from safetensors.torch import load_file, save_file

    from connito.composition.fft_moe.server import aggregate_round, client_start

    plan = planned(root, "federated")
    if not _has_stage(plan, f"round-{index}"):
        raise ValueError(f"round_index={index}: {root} has no round {index}")
    require_done(root, plan, f"round-{index}", "nothing was aggregated")
    settings = plan.all_settings()
    previous = load_file(str(round_dir(root, index) / GLOBAL))
    updates = {client: root / f"r{index}-{client}" / UPDATE for client in settings["clients"]}
    out = aggregate_round(updates, base_dir(settings, root), previous, skip_refused=settings["skip_refused"])
    for client in out["refused"]:
        log.warning("round %d: client %s's update refused (%s); aggregated without it", index, client,
                    out["refused"][client])  # fmt: skip
    target = round_dir(root, index + 1)
    target.mkdir(parents=True, exist_ok=True)
    for client in settings["clients"]:
        start = load_file(str(start_file(root, index, client)))
        if client not in out["routers"]:  # refused this round: it starts the next one as it started this one
            own = start if settings.get("local_only") else {n: t for n, t in start.items() if ".router." in n}
        elif settings.get("local_only"):  # the baseline: its own experts and router, nobody else's
            own = out["updates"][client]
        else:
            own = out["routers"][client]
        tensors = own if settings.get("local_only") else client_start(out["global"], own)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(start_file(root, index + 1, client)))
    record = AggregationRecord(
        round=index,
        local_only=bool(settings.get("local_only")),
        accepted=out["accepted"],
        refused=out["refused"],
        contributors=out["contributors"],
        bytes_uploaded=out["bytes"],
    )
    record.save(target / AGGREGATION)
    save_file({n: t.contiguous() for n, t in out["global"].items()}, str(target / GLOBAL))  # last: the job's output
    print(f"round {index}: accepted {out['accepted']}, refused {sorted(out['refused'])}, bytes {out['bytes']}")
    return record


def run_export(root: Path) -> dict:
    """The export job: per client ``export/<client>/hf`` (base + the last round's global experts + its own router, a
    checkpoint transformers loads) and ``export/<client>/adapters`` (the adapters alone, an update package); then
    the report: held-out loss on every client's domain of the base and of each client's model (its own router and
    budget), and the bytes each client uploaded per round (``federated_report.json`` / ``.md``)."""
    from safetensors.torch import load_file

    from connito.analysis.held_out import checkpoint_losses, held_out_batches, losses_table
    from connito.composition.fft_moe import AdapterSpec
    from connito.composition.fft_moe.export import export_client
    from connito.composition.fft_moe.server import UPDATE_FILE, UpdateRecord, write_update

    plan = planned(root, "federated")
    settings = plan.all_settings()
    rounds = settings["rounds"]
    require_done(root, plan, f"aggregate-{rounds - 1}", "nothing was exported")
    options = AdapterOptions(**settings["adapter"])
    spec = AdapterSpec(options.num_experts, options.width, options.activation,
                       None if options.layers is None else tuple(options.layers))  # fmt: skip
    base = base_dir(settings, root)
    models = {"base": base}
    for client, budget in zip(settings["clients"], settings["budgets"], strict=True):
        tensors = load_file(str(start_file(root, rounds, client)))
        out = root / "export" / client
        models[f"{client} (budget {budget})"] = export_client(base, tensors, spec, budget, out / "hf", overwrite=True)
        last = UpdateRecord.load(root / f"r{rounds - 1}-{client}" / UPDATE / UPDATE_FILE)
        record = {"top_k": last.top_k, "layers": last.layers, "tokens_per_expert": last.tokens_per_expert}
        write_update(tensors, base, out / "adapters", client=client, num_examples=last.num_examples, record=record,
                     overwrite=True)  # fmt: skip
    clients = list(settings["clients"])
    held_out = held_out_batches(DataConfig(**settings["data"]), base, domains=clients,
                                eval_tokens=settings["eval_tokens"] * len(clients))  # fmt: skip
    rows = {name: checkpoint_losses(path, held_out) for name, path in models.items()}
    uploads = [AggregationRecord.load(round_dir(root, r + 1) / AGGREGATION).bytes_uploaded for r in range(rounds)]
    record = {
        "schema": "connito.federated_report/1",
        "models": {name: str(path) for name, path in models.items()},
        "validation_loss": rows,
        "bytes_uploaded_per_round": uploads,
        "settings": settings,
    }
    atomic_write_json(root / f"{REPORT}.json", record)
    table = losses_table(rows, [*clients, "all"])
    sizes = "\n".join(f"| {r} | " + " | ".join(str(u.get(c, "refused")) for c in clients) + " |"
                      for r, u in enumerate(uploads))  # fmt: skip
    upload_table = "| round | " + " | ".join(clients) + " |\n" + "|---" * (len(clients) + 1) + "|\n" + sizes
    text = f"{table}\n\nBytes each client uploaded per round\n\n{upload_table}\n"
    (root / f"{REPORT}.md").write_text(f"# FFT-MoE: held-out loss per client domain (nats)\n\n{text}")
    print(text)
    return record


__all__ = ["WEIGHTS", "FederatedConfig", "plan_federated", "run_aggregate", "run_export", "run_init"]
