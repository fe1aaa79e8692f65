"""The training loop around the DeepSpeed engine.

One function, :func:`run_training`, serves every launcher: a plain process, ``torchrun --nproc_per_node N``,
the ``deepspeed`` launcher and SLURM (see :mod:`connito.training.distributed`). Data parallel over all ranks;
ZeRO stage by config; expert parallelism (``parallel.ep_size``) through DeepSpeed AutoEP, which keeps every rank
reading its own micro-batch (see :mod:`connito.parallel.expert_parallel`).
"""

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from connito.data import PreparedData, prepare_data, unigram_cross_entropy
from connito.experts import adapter_for
from connito.models.loading import build_model, has_tokenizer, resolve_family, tokenizer_token_ids
from connito.parallel import router_aux
from connito.parallel.expert_parallel import num_routed_experts, validate_expert_parallel
from connito.training import checkpointing, relayout
from connito.training.batches import PackedSplit, StepSampler
from connito.training.config import ConnitoConfig, TrainConfig
from connito.training.deepspeed_config import build_deepspeed_config, validate_engine
from connito.training.distributed import DistInfo, init_distributed
from connito.training.evaluation import evaluate_by_domain
from connito.training.export import export_hf
from connito.training.metrics import MetricsSink
from connito.training.progress import Progress
from connito.training.report import format_domain_table
from connito.training.schedule import warmup_cosine
from connito.training.step import StepLosses, train_step

log = logging.getLogger("connito.training")


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    finished: bool
    """False when the run stopped early (train.stop_after) and can be resumed."""
    validation: dict[str, float] = field(default_factory=dict)
    unigram: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    model: torch.nn.Module | None = None
    """The trained model (``engine.module``; partitioned under ZeRO-3, expert-sharded under parallel.ep_size>1)."""
    engine: object | None = None
    """The DeepSpeed engine (optimizer state, checkpoints)."""


def validate_train(train: TrainConfig) -> None:
    for name in ("steps", "micro_batch_size", "grad_accum"):
        if getattr(train, name) <= 0:
            raise ValueError(f"train.{name}={getattr(train, name)} must be a positive integer")
    if train.resume not in ("auto", "never") and not Path(train.resume).expanduser().is_dir():
        raise ValueError(
            f"train.resume='{train.resume}' is neither auto, never, nor an existing checkpoint directory. "
            "Use train.resume=auto to continue the run's latest checkpoint"
        )


def _prepare_data_once(cfg: ConnitoConfig, info: DistInfo) -> PreparedData:
    """Rank 0 builds the cache (downloads, tokenizer, packing); the others wait, then read it.

    Fine-tuning a checkpoint that ships a tokenizer tokenizes with that tokenizer unless data.tokenizer_path
    says otherwise.
    """
    if cfg.model.path and not cfg.data.tokenizer_path and has_tokenizer(cfg.model.path):
        cfg.data.tokenizer_path = cfg.model.path
        if info.is_main:
            log.info("tokenizing with the checkpoint's tokenizer (%s)", cfg.model.path)
    if info.is_main:
        prepared = prepare_data(cfg.data, progress=cfg.logging.progress)
    if info.world_size > 1:
        dist.barrier()
    if not info.is_main:
        prepared = prepare_data(cfg.data, progress=False)
    return prepared


def _optimizer(model: torch.nn.Module, cfg: ConnitoConfig, split_moe: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases, routing biases).

    ``split_moe``: put expert parameters (AutoEP's, after the replacement) in their own ``moe`` groups, which
    DeepSpeed's ZeRO-1/2 and bf16 optimizers need to reduce them over the expert-data-parallel group."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if split_moe:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def _build_engine(model, cfg: ConnitoConfig, info: DistInfo, model_type: str, load_universal: bool):
    """The DeepSpeed engine around ``model`` with AdamW and the warm-up + cosine schedule."""
    import deepspeed

    if cfg.parallel.ep_size > 1 and (cfg.engine.zero_stage > 0 or cfg.engine.precision == "bf16"):
        # DeepSpeed builds the optimizer after AutoEP replaced the MoE blocks, so the expert groups hold the
        # live expert-parallel parameters.
        def optimizer(_params):
            return _optimizer(model, cfg, split_moe=True)

        def scheduler(opt):
            return warmup_cosine(opt, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    else:
        optimizer = _optimizer(model, cfg)
        scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    ds_config = build_deepspeed_config(
        cfg.engine, cfg.optim, cfg.train, info.world_size, cfg.parallel, model_type, load_universal=load_universal
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler


def _resume_point(cfg: ConnitoConfig, checkpoint_root: Path) -> Path | None:
    if cfg.train.resume == "never":
        if checkpointing.find_latest(checkpoint_root) is not None:
            raise ValueError(
                f"{checkpoint_root} already holds checkpoints and train.resume=never. Use train.resume=auto to "
                "continue that run, or choose another run.name"
            )
        return None
    if cfg.train.resume == "auto":
        return checkpointing.find_latest(checkpoint_root)
    return Path(cfg.train.resume).expanduser()


def run_training(cfg: ConnitoConfig, run_dir: Path) -> TrainResult:
    info = init_distributed(cfg.engine.backend)
    validate_engine(cfg.engine, info.accelerator)
    validate_train(cfg.train)

    family = resolve_family(cfg.model)  # fails fast on a bad model.path before data work starts
    if cfg.parallel.ep_size != 1:
        validate_expert_parallel(
            cfg.parallel.ep_size,
            info.world_size,
            family.model_type,
            num_routed_experts(cfg.model),
            cfg.engine.zero_stage,
        )
    # Resume point and layout check before any work: a checkpoint this run cannot load stops here.
    checkpoint_root = run_dir / "checkpoints"
    resume_from = _resume_point(cfg, checkpoint_root)
    layout = relayout.Layout(cfg.parallel.ep_size, info.world_size, cfg.engine.zero_stage, family.model_type)
    saved_layout, convert = None, False
    if resume_from is not None:
        checkpointing.require_complete(resume_from)
        saved_layout = relayout.read_layout(resume_from)
        convert = relayout.plan_resume(saved_layout, layout, resume_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = _prepare_data_once(cfg, info)
    tokenizer = prepared.load_tokenizer()
    train_split = PackedSplit.from_dataset(prepared.load_split("train"))
    val_split = PackedSplit.from_dataset(prepared.load_split("validation"))
    sampler = StepSampler(
        len(train_split), cfg.train.micro_batch_size, cfg.train.grad_accum, info.world_size, info.rank, cfg.train.seed
    )

    model = build_model(cfg.model, len(tokenizer), cfg.train.seed, token_ids=tokenizer_token_ids(tokenizer))
    universal, relaid = None, None
    if convert and layout.zero_stage == 0:  # ZeRO 0 at another ep_size: Connito re-lays it after initialize
        from functools import partial

        from connito.training import relayout_zero0

        relaid = partial(
            relayout_zero0.load,
            checkpoint=resume_from,
            target=relayout_zero0.folder_for(resume_from, layout.ep_size, layout.world_size),
            hf_shapes={name: tuple(t.shape) for name, t in model.state_dict().items()},
            layout=adapter_for(family.model_type).layout,
            is_main=info.is_main,
        )
    elif convert:  # rank 0 converts once; the others wait
        hf_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        universal = relayout.prepare_universal(
            resume_from, saved_layout, layout, hf_shapes, adapter_for(family.model_type).layout, info.is_main
        )
    engine, scheduler = _build_engine(model, cfg, info, family.model_type, load_universal=universal is not None)
    router_aux.attach(engine.module)  # the load-balancing loss where AutoEP hides the router logits from transformers
    device = engine.device

    state = checkpointing.TrainState()
    sink = MetricsSink(run_dir, info.is_main, cfg.logging.wandb, cfg.logging.wandb_project, cfg.run.name, asdict(cfg))
    if resume_from is not None:
        state = checkpointing.load(engine, resume_from, universal=universal, relaid=relaid)
        sink.truncate_after(state.step)
        if info.is_main:
            log.info("resumed from %s at step %d", resume_from, state.step)

    tokens_per_step = sampler.global_batch * train_split.input_ids_NT.shape[1]
    progress = Progress(cfg.train.steps, state.step, enabled=info.is_main and cfg.logging.progress)
    started_at, started_step = time.perf_counter(), state.step
    result = TrainResult(run_dir=run_dir, steps_done=state.step, finished=False, model=engine.module, engine=engine)
    last_checkpoint_step = state.step if resume_from is not None else -1

    def checkpoint() -> None:
        nonlocal last_checkpoint_step
        if last_checkpoint_step != state.step:
            result.checkpoint = checkpointing.save(
                engine, checkpoint_root, state, info.is_main, cfg.train.keep_checkpoints, layout.to_json()
            )
            last_checkpoint_step = state.step

    engine.train()
    while state.step < cfg.train.steps:
        losses = train_step(engine, train_split, sampler, state.step, cfg.model.aux_loss_coef, device)
        state.step += 1
        state.tokens_seen += tokens_per_step

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            elapsed = time.perf_counter() - started_at
            tokens_per_s = (state.step - started_step) * tokens_per_step / max(elapsed, 1e-9)
            metrics = _step_metrics(losses, engine, scheduler, info.world_size, tokens_per_s)
            sink.log(state.step, metrics)
            progress.update(state.step, loss=metrics["train/loss"], tokens_per_s=tokens_per_s)

        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < cfg.train.steps:
            result.validation = _evaluate(engine, val_split, prepared, cfg, info, device)
            sink.log(state.step, {f"val/{k}": v for k, v in result.validation.items()})
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
            checkpoint()
        if cfg.train.stop_after and state.step - started_step >= cfg.train.stop_after and state.step < cfg.train.steps:
            break
    progress.close()
    checkpoint()
    result.steps_done = state.step
    result.finished = state.step >= cfg.train.steps

    if result.finished:
        result.validation = _evaluate(engine, val_split, prepared, cfg, info, device)
        sink.log(state.step, {f"val/{k}": v for k, v in result.validation.items()})
        if info.is_main:
            result.unigram = unigram_cross_entropy(prepared, "validation")
        if cfg.train.export:
            result.export_dir = run_dir / "hf"
            export_hf(engine, tokenizer, result.export_dir, info.is_main, cfg.engine.zero_stage)
        if info.is_main:
            _write_summary(result, family.model_type)
    sink.close()
    return result


def _step_metrics(losses: StepLosses, engine, scheduler, world_size: int, tokens_per_s: float) -> dict[str, float]:
    """The logged metrics of a step: losses averaged over ranks (a collective), learning rate, grad norm, speed."""
    stats = torch.tensor([losses.lm, losses.aux or 0.0], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(stats)
        stats /= world_size
    metrics = {
        "train/loss": stats[0].item(),
        "train/lr": scheduler.get_last_lr()[0],
        "train/tokens_per_s": tokens_per_s,
    }
    if losses.aux is not None:
        metrics["train/aux_loss"] = stats[1].item()
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


def _evaluate(engine, val_split, prepared, cfg, info, device) -> dict[str, float]:
    if cfg.parallel.ep_size > 1:
        # Every forward is an all-to-all over the expert-parallel group: all ranks must run the same number of
        # micro-batches, so drop the last len % world rows (at most world - 1).
        keep = len(val_split) - len(val_split) % info.world_size
        val_split = PackedSplit(val_split.input_ids_NT[:keep], val_split.domain_ids_NT[:keep])
    return evaluate_by_domain(
        engine.module,
        val_split,
        prepared.domains,
        cfg.train.micro_batch_size,
        cfg.train.eval_batches,
        info.rank,
        info.world_size,
        device,
    )


def _write_summary(result: TrainResult, model_type: str) -> None:
    summary = {
        "model_type": model_type,
        "steps": result.steps_done,
        "validation_loss": result.validation,
        "unigram_loss": result.unigram,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "hf_export": str(result.export_dir) if result.export_dir else None,
    }
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_domain_table(result.validation, result.unigram), flush=True)
    print(f"checkpoint: {result.checkpoint}", f"HF export:  {result.export_dir}", sep="\n", flush=True)
    print(f"metrics:    {result.run_dir / 'metrics.jsonl'}", flush=True)
