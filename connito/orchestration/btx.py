"""``connito btx``: Branch-Train-MiX (Sukhbaatar et al. 2024) as a pipeline of independent jobs.

Stages (each a set of jobs, each job one ``connito`` command with its own run directory under ``<run>/``):

- ``seed`` (only without ``seed.path``): ``connito train`` of the dense ``seed.model`` on every domain;
- ``branches``: one ``branch-<domain>`` job per domain, ``connito train`` from the seed on that domain alone; beside
  them (``baseline.enabled``) ``dense``: the seed trained on every domain for as many steps as the branches and the
  fine-tuning together, the step-matched dense model BTX has to beat;
- ``merge``: ``connito btx stage=merge``, :func:`connito.composition.btx_merge.merge_branches` into ``merged/``;
- ``finetune`` (``finetune.enabled``): ``connito train`` of the merged MoE on every domain, the routers alone (or
  every parameter), top-2 routing, load balancing 0.01 (the paper's);
- ``report``: ``connito btx stage=report``, held-out loss per domain of the seed, each branch, the dense baseline,
  the merged and the fine-tuned model (``btx_report.md`` / ``.json``).

The merge job checks, before it reads a tensor, that every branch job of the plan is ``done`` (the orchestrator
would not start it otherwise; a merge started by hand is checked too), so an incomplete set is never merged.
Everything a result depends on is in the plan: the seed, domains, data and trainer overrides pipeline-wide (a
rerun with others is refused), the merge options (``mix``), the fine-tuning and the report's token budget as
their stages' own settings, so changing one of those reruns that stage and the ones after it and keeps the
branches (:mod:`connito.orchestration.plan`).

**Decisions.** The merged model's router starts random (the paper's choice) or, with ``mix.router_init=
domain_means``, with row i = the seed's mean FFN input on domain i's training text per layer
(:func:`connito.composition.hidden_means.mean_ffn_inputs`). Fine-tuning trains every parameter (``finetune.train=
all``, the paper's) or the routers alone (``router``: experts and everything else frozen by the slice-exact
gradient masks). The dense baseline is matched in steps (and so in tokens), not in FLOPs: a top-2 step of the
merged model costs about twice the FFN compute of a dense step. ``mix.chunks=C`` splits each FFN into C experts
(N x C experts, top-2C: the same active FFN width per token), see :mod:`connito.composition.btx_merge`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connito.common.atomic import atomic_write_json
from connito.data.config import DataConfig
from connito.models.presets import model_preset
from connito.orchestration.config import LauncherConfig
from connito.orchestration.jobs import Stage
from connito.orchestration.overrides import changed_overrides, override_value
from connito.orchestration.plan import Plan
from connito.orchestration.recipe import (
    WEIGHTS,
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

FINETUNE_TRAINS = ("router", "all", "stitches")


@dataclass
class SeedConfig:
    path: str = ""
    """A dense checkpoint directory (llama, qwen3 or qwen2) to branch from; the seed stage is skipped. Empty:
    the seed stage trains ``model`` for ``steps`` steps on every domain first."""
    model: str = "llama_tiny"
    """Without ``path``: the ``configs/model`` preset of the dense seed (llama_tiny, qwen3_tiny, qwen2_tiny)."""
    steps: int = 300


@dataclass
class BranchConfig:
    steps: int = 150
    """Training steps of each branch, on its domain alone."""


MIX_METHODS = ("btx", "bam", "bts")


@dataclass
class MixConfig:
    """The merge: :func:`connito.composition.btx_merge.merge_branches` (``method=btx``) or
    :func:`connito.composition.bam_merge.merge_bam` (``method=bam``)."""

    method: str = "btx"
    """``btx``: the branches' FFNs become experts, everything else averaged (Sukhbaatar et al. 2024). ``bam``: their
    attention layers become soft-routed attention experts too (Zhang et al. 2024), in a checkpoint with Connito's
    modeling code (``trust_remote_code=True`` for plain transformers)."""
    kv_sharing: bool = False
    """method=bam: the attention experts share one key/value projection (the branches' mean), BAM's KV variant."""
    parallel_block: bool = False
    """method=bam: BAM's parallel attention + FFN block (a sequential seed's function changes; fine-tuning recovers)."""
    stitch_every: int = 2
    """method=bts: a stitch layer after every this many decoder layers (Branch-Train-Stitch, Zhang et al. 2025: the
    seed is the frozen hub, the branches stay frozen beside it, only the stitches train; finetune.train=stitches)."""

    generalist: bool = False
    """One more expert: the seed's FFN (the paper's generalist)."""
    shared: str = "average"
    """Attention, embeddings, norms: ``average`` over the branches (the paper's) or the ``seed``'s."""
    router_init: str = "random"
    """``random`` (the paper's) or ``domain_means`` (row i: the seed's mean FFN input on domain i)."""
    router_tokens: int = 32768
    """router_init=domain_means: training tokens per domain the means are taken over."""
    seed: int = 0
    """Seed of the random router weights."""
    chunks: int = 1
    """Experts per FFN: each FFN cut into this many along its width, top-k 2 x chunks (1: whole FFNs, the default)."""


@dataclass
class BaselineConfig:
    enabled: bool = True
    """Train the step-matched dense baseline (job ``dense``): the seed continued on every domain for
    ``len(domains) x branch.steps + finetune.steps`` steps."""


@dataclass
class FinetuneConfig:
    enabled: bool = True
    steps: int = 100
    train: str = "all"
    """``all``: every parameter (the paper's); ``router``: the routers alone; ``stitches``: the stitch layers alone
    (mix.method=bts, which requires it: its hub and branches stay frozen)."""
    aux_loss_coef: float = 0.01
    """Load-balancing coefficient (the paper's 0.01)."""


@dataclass
class BtxConfig:
    """Root config of ``connito btx`` (``configs/btx.yaml``)."""

    run: RunConfig = field(default_factory=lambda: RunConfig(name="btx"))
    data: DataConfig = field(default_factory=DataConfig)
    """The text every job trains on and is measured on; each branch gets ``domains=[<its domain>]``."""
    domains: list[str] = field(default_factory=list)
    """One branch per domain. Empty: ``data.domains``."""
    seed: SeedConfig = field(default_factory=SeedConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train_overrides: list[str] = field(default_factory=list)
    """More ``connito train`` overrides for every training job (seed, branches, fine-tuning); quote each item on
    the command line: ``'train_overrides=["train.micro_batch_size=4","engine=zero1"]'``."""
    eval_tokens: int = 32768
    """Held-out tokens per domain and model in the report."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rerun: str = "missing"
    """``missing``: run the jobs that are not done (after a failure: only the failed ones and what follows them);
    ``all``: discard every job's state and start over."""
    stage: str = ""
    """Empty: plan and run the whole pipeline. ``plan``: write ``<run>/pipeline.json`` and list the jobs, run
    nothing (to submit stages by hand with ``launch/slurm/pipeline_stage.sbatch``). ``merge`` / ``report``: run
    that stage of an existing plan in this process (what the merge and report jobs run)."""


def branch_domains(cfg: BtxConfig) -> list[str]:
    domains = list(cfg.domains or cfg.data.domains)
    if len(domains) < 2:
        raise ValueError(f"domains={domains}: branch-train-mix needs at least 2 domains, one branch each")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains}: each domain once")
    return domains


def seed_dir(cfg: BtxConfig, root: Path) -> Path:
    return Path(cfg.seed.path).expanduser().resolve() if cfg.seed.path else root / "seed" / "hf"


def _check_chunks(cfg: BtxConfig) -> None:
    """``mix.chunks`` divides the seed's FFN width, checked before any branch trains (the merge checks it again)."""
    chunks = cfg.mix.chunks
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"mix.chunks={chunks!r}: expected a positive integer (1 keeps whole FFNs)")
    if cfg.seed.path:
        config = json.loads((Path(cfg.seed.path).expanduser() / "config.json").read_text())
    else:
        config = model_preset(cfg.seed.model, "seed.model").get("hf_config", {})
    width = config.get("intermediate_size")
    if width and width % chunks:
        raise ValueError(
            f"mix.chunks={chunks} does not divide the seed's FFN width (intermediate_size={width}): choose a divisor "
            f"of {width}"
        )


def _check_mix(mix: MixConfig) -> None:
    if mix.method not in MIX_METHODS:
        raise ValueError(f"mix.method={mix.method!r}: choose one of {', '.join(MIX_METHODS)}")
    if mix.method == "btx" and (mix.kv_sharing or mix.parallel_block):
        raise ValueError("mix.kv_sharing and mix.parallel_block shape BAM's attention experts: add mix.method=bam")
    if mix.method in ("bam", "bts") and (mix.generalist or mix.chunks != 1):
        raise ValueError(
            f"mix.method={mix.method} uses whole branches: mix.generalist and mix.chunks are BTX's options (drop "
            "them, or use mix.method=btx)"
        )
    if mix.method != "bts" and mix.stitch_every != 2:
        raise ValueError("mix.stitch_every places BTS's stitch layers: add mix.method=bts")


def _check_finetune(cfg: BtxConfig) -> None:
    train = cfg.finetune.train
    if train not in FINETUNE_TRAINS:
        raise ValueError(f"finetune.train={train!r}: choose one of {', '.join(FINETUNE_TRAINS)}")
    if cfg.finetune.enabled and (train == "stitches") != (cfg.mix.method == "bts"):
        raise ValueError(
            "mix.method=bts keeps its hub and branches frozen and trains the stitches alone: set "
            "finetune.train=stitches"
            if cfg.mix.method == "bts"
            else "finetune.train=stitches trains BTS's stitch layers: add mix.method=bts (or train router or all)"
        )


def plan_btx(cfg: BtxConfig) -> Plan:
    """The stages of ``cfg``'s pipeline (see the module docstring)."""
    _check_mix(cfg.mix)
    _check_finetune(cfg)
    if cfg.mix.router_init not in ("random", "domain_means"):
        raise ValueError(f"mix.router_init={cfg.mix.router_init!r}: choose random or domain_means")
    if cfg.seed.path and not (Path(cfg.seed.path).expanduser() / "config.json").is_file():
        raise ValueError(f"seed.path={cfg.seed.path!r} is not a checkpoint directory (no config.json)")
    _check_chunks(cfg)
    root, domains = run_root(cfg.run), branch_domains(cfg)
    ranks = job_ranks(cfg.launcher)
    data = changed_overrides("data", cfg.data)
    stages = []
    if not cfg.seed.path:
        seed = train_job("seed", root, [f"model={cfg.seed.model}", *data], cfg.seed.steps, ranks, cfg.train_overrides)
        stages.append(Stage("seed", (seed,)))
    start = [f"model={cfg.seed.model}", f"model.path={override_value(str(seed_dir(cfg, root)))}"]
    branches = tuple(
        train_job(f"branch-{domain}", root, [*start, *changed_overrides("data", cfg.data, domains=[domain])],
                  cfg.branch.steps, ranks, cfg.train_overrides)
        for domain in domains
    )  # fmt: skip
    if cfg.baseline.enabled:
        steps = len(domains) * cfg.branch.steps + (cfg.finetune.steps if cfg.finetune.enabled else 0)
        branches += (train_job("dense", root, [*start, *data], steps, ranks, cfg.train_overrides),)
    merge = stage_job("btx", "merge", root, "merge", root / "merged" / WEIGHTS, workdir=str(root / "merged"))
    stages += [Stage("branches", branches), Stage("merge", (merge,), {"mix": asdict(cfg.mix)})]
    if cfg.finetune.enabled:
        trainable = ["+callbacks.trainable.experts=[]", "+callbacks.trainable.routers=true"]
        if cfg.mix.method == "bam":  # the attention experts' routers too
            trainable.append("+callbacks.trainable.modules=[model.layers.*.self_attn.router.weight]")
        if cfg.finetune.train == "stitches":
            trainable = ["+callbacks.trainable.experts=[]", "+callbacks.trainable.modules=[stitches.*]"]
        finetune = [
            f"model.path={override_value(str(root / 'merged'))}",
            "model.name=btx",
            f"model.aux_loss_coef={cfg.finetune.aux_loss_coef}",
            *data,
            *(trainable if cfg.finetune.train in ("router", "stitches") else []),
        ]
        finetune_job = train_job("finetune", root, finetune, cfg.finetune.steps, ranks, cfg.train_overrides)
        stages.append(Stage("finetune", (finetune_job,), {"finetune": asdict(cfg.finetune)}))
    report = stage_job("btx", "report", root, "report", root / "btx_report.json")
    stages.append(Stage("report", (report,), {"eval_tokens": cfg.eval_tokens}))
    settings = {
        "domains": domains,
        "seed": asdict(cfg.seed),
        "branch": asdict(cfg.branch),
        "baseline": asdict(cfg.baseline),
        "data": asdict(cfg.data),
        "train_overrides": list(cfg.train_overrides),
    }
    return Plan("btx", tuple(stages), settings)


def run_merge(root: Path) -> Path:
    """The merge job: every branch done, then merge them into ``<root>/merged`` (BTX or BAM, by ``mix.method``)."""
    import torch

    from connito.composition.bam_merge import merge_bam
    from connito.composition.bts_stitch import stitch_branches
    from connito.composition.btx_merge import merge_branches

    plan = planned(root, "btx")
    require_done(root, plan, "branches")
    settings = plan.all_settings()
    mix = MixConfig(**settings["mix"])
    seed = Path(settings["seed"]["path"]).expanduser().resolve() if settings["seed"]["path"] else root / "seed" / "hf"
    branches = [root / f"branch-{domain}" / "hf" for domain in settings["domains"]]
    router_init: str | torch.Tensor = mix.router_init
    if mix.router_init == "domain_means":
        router_init = domain_mean_rows(seed, DataConfig(**settings["data"]), settings["domains"], mix)
    if mix.method == "bts":
        return stitch_branches(
            seed, branches, root / "merged", branch_names=settings["domains"], stitch_every=mix.stitch_every,
            seed=mix.seed, overwrite=True,
        )  # fmt: skip
    if mix.method == "bam":
        return merge_bam(
            seed, branches, root / "merged", kv_sharing=mix.kv_sharing, parallel_block=mix.parallel_block,
            shared=mix.shared, router_init=router_init, seed=mix.seed, overwrite=True,
        )  # fmt: skip
    return merge_branches(
        seed, branches, root / "merged", generalist=mix.generalist, shared=mix.shared, router_init=router_init,
        seed=mix.seed, chunks=mix.chunks, overwrite=True,
    )  # fmt: skip


def domain_mean_rows(seed: Path, data: DataConfig, domains: list[str], mix: MixConfig):
    """[L, E, H]: per layer, row i = the seed's mean FFN input over domain i's training text (the generalist's row,
    when there is one, the mean over all domains); with ``mix.chunks`` > 1 each row once per chunk of its source."""
    sets = [[domain] for domain in domains] + ([list(domains)] if mix.generalist else [])
    rows_LSH = mean_hidden_rows(seed, data, sets, mix.router_tokens)
    return rows_LSH.repeat_interleave(mix.chunks, dim=1)


def run_report(root: Path) -> dict:
    """The report job: held-out loss per domain of the seed, each branch, the merged and the fine-tuned model;
    writes ``btx_report.json`` and ``btx_report.md``."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches, load_checkpoint, losses_table

    plan = planned(root, "btx")
    settings = plan.all_settings()
    require_done(root, plan, "merge", "no report was written")
    seed = Path(settings["seed"]["path"]).expanduser().resolve() if settings["seed"]["path"] else root / "seed" / "hf"
    models = {"seed": seed}
    models.update({f"branch {d}": root / f"branch-{d}" / "hf" for d in settings["domains"]})
    if settings.get("baseline", {}).get("enabled"):
        models["dense, step-matched"] = root / "dense" / "hf"
    method = settings.get("mix", {}).get("method", "btx")
    merged = "merged" if method == "btx" else f"merged ({method.upper()})"
    models[merged] = root / "merged"
    if settings.get("finetune", {}).get("enabled"):
        models[f"{merged} + {settings['finetune']['train']} fine-tuning"] = root / "finetune" / "hf"
    held_out = held_out_batches(DataConfig(**settings["data"]), seed, domains=settings["domains"],
                                eval_tokens=settings["eval_tokens"] * len(settings["domains"]))  # fmt: skip
    rows = {}
    for name, path in models.items():
        rows[name] = checkpoint_losses(path, held_out)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()))
    if method == "bts":  # each branch opted out of the final model, no retraining: what the others keep
        final = root / "finetune" / "hf" if settings.get("finetune", {}).get("enabled") else root / "merged"
        model = load_checkpoint(final)
        for domain in settings["domains"]:
            model.config.active_branches = [d for d in settings["domains"] if d != domain]
            name = f"{list(models)[-1]}, {domain} opted out"
            rows[name] = held_out.losses(model)
            log.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()))
    columns = [*held_out.domains, "all"]
    table = losses_table(rows, columns)
    record = {
        "schema": "connito.btx_report/1",
        "domains": held_out.domains,
        "models": {k: str(v) for k, v in models.items()},
        "validation_loss": rows,
        "settings": settings,
    }
    atomic_write_json(root / "btx_report.json", record)
    (root / "btx_report.md").write_text(f"# BTX: held-out loss per domain (nats)\n\n{table}\n")
    print(table)
    return record
