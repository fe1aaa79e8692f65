"""The one training loop around the DeepSpeed engine, and the events methods plug into.

:class:`Trainer` serves every launcher (a plain process, ``torchrun``, the ``deepspeed`` launcher, SLURM: see
:mod:`connito.training.distributed`) and every method: a method is a callback and loss terms chosen by config
(:mod:`connito.training.callbacks`), never a loop of its own. Logging, validation, checkpoints, the HF export and
the load-balancing loss are callbacks too (:mod:`connito.training.callbacks.builtin`).

Data parallel over all ranks; ZeRO stage by config; expert parallelism (``parallel.ep_size``) through DeepSpeed
AutoEP, which keeps every rank reading its own micro-batch (see :mod:`connito.parallel.expert_parallel`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from connito.data import PreparedData, prepare_data
from connito.data.config import DataConfig
from connito.data.packed import PackedSplit
from connito.models.loading import build_model, has_tokenizer, resolve_family, tokenizer_token_ids
from connito.parallel.expert_parallel import num_routed_experts, validate_expert_parallel
from connito.parallel.grad_clip import clip_grad_norm_expert_parallel_
from connito.routing import RouterObserver
from connito.training import checkpointing, relayout, relayout_zero0
from connito.training.batches import StepSampler
from connito.training.callbacks import Callback, LossTerm, MicroBatch, build_callbacks, import_plugins
from connito.training.callbacks.balancing import RoutingBalance
from connito.training.callbacks.builtin import Checkpointer, Evaluator, Exporter, LoadBalancing, MetricsLogger
from connito.training.config import ConnitoConfig, TrainConfig
from connito.training.deepspeed_config import connito_clips, validate_engine
from connito.training.deepspeed_internals import can_skip_update
from connito.training.distributed import DistInfo, init_distributed
from connito.training.engine import build_engine
from connito.training.evaluation import evaluate_by_domain
from connito.training.metrics import MetricsSink
from connito.training.run_state import Layout, TrainState, read_layout
from connito.training.step import NONFINITE_MODES, train_step
from connito.training.time_slice import TimeSlice, parse_duration, write_status

log = logging.getLogger("connito.training")


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    finished: bool
    """False when the run stopped early (train.stop_after, train.stop_after_time) and can be resumed."""
    stopped_by: str | None = None
    """Why an unfinished run stopped: ``train.stop_after`` or ``train.stop_after_time``."""
    validation: dict[str, float] = field(default_factory=dict)
    unigram: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    model: torch.nn.Module | None = None
    """The trained model (``engine.module``; partitioned under ZeRO-3, expert-sharded under parallel.ep_size>1)."""
    engine: object | None = None
    """The DeepSpeed engine (optimizer state, checkpoints)."""
    trainer: Trainer | None = None


def validate_train(train: TrainConfig) -> None:
    for name in ("steps", "micro_batch_size", "grad_accum"):
        if getattr(train, name) <= 0:
            raise ValueError(f"train.{name}={getattr(train, name)} must be a positive integer")
    parse_duration(train.stop_after_time)  # a bad duration stops here, before any work
    if train.nonfinite_loss not in NONFINITE_MODES:
        raise ValueError(f"train.nonfinite_loss='{train.nonfinite_loss}' is not one of {', '.join(NONFINITE_MODES)}")
    if train.resume not in ("auto", "never") and not Path(train.resume).expanduser().is_dir():
        raise ValueError(
            f"train.resume='{train.resume}' is neither auto, never, nor an existing checkpoint directory. "
            "Use train.resume=auto to continue the run's latest checkpoint"
        )


def _prepare_data_once(cfg: ConnitoConfig, info: DistInfo) -> tuple[PreparedData, DataConfig]:
    """Rank 0 builds the cache (downloads, tokenizer, packing); the others wait, then read it. Returns the data and
    the data config it was prepared with.

    Fine-tuning a checkpoint that ships a tokenizer tokenizes with that tokenizer unless data.tokenizer_path
    says otherwise (a new data config names it; ``cfg`` is not changed).
    """
    data = cfg.data
    if cfg.model.path and not data.tokenizer_path and has_tokenizer(cfg.model.path):
        data = dataclasses.replace(data, tokenizer_path=cfg.model.path)
        if info.is_main:
            log.info("tokenizing with the checkpoint's tokenizer (%s)", cfg.model.path)
    if info.is_main:
        prepared = prepare_data(data, progress=cfg.logging.progress)
    if info.world_size > 1:
        dist.barrier()
    if not info.is_main:
        prepared = prepare_data(data, progress=False)
    return prepared, data


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


class Trainer:
    """One run: :meth:`run` sets everything up (checks first, then data, model, engine, resume) and trains.

    What callbacks may use: ``cfg``, ``info`` (rank, world), ``run_dir``, ``family``, ``engine`` (its ``module`` is
    the live model, AutoEP-swapped under expert parallelism), ``scheduler``, ``state`` (step, tokens seen),
    ``train_split`` / ``val_split`` / ``sampler`` / ``prepared`` (the data), ``sink`` (metrics), ``result``,
    :meth:`add_loss_term`, :meth:`router_observer`, :meth:`evaluate`, :meth:`save_checkpoint`, and
    ``task_loss_weight``: the weight of the next-token loss in the training loss (1; a callback may set it per
    micro-batch in ``on_micro_batch``, e.g. DES-MoE's ``lambda * L_KD + (1 - lambda) * L_task``).
    """

    def __init__(self, cfg: ConnitoConfig, run_dir: Path, callbacks: list[Callback] | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        import_plugins(cfg.plugins)
        user = build_callbacks(cfg.callbacks) + list(callbacks or [])  # an unknown name stops here, before any work
        for callback in user:
            callback.name = callback.name or type(callback).__name__
        self.callbacks: list[Callback] = user + [
            LoadBalancing(),
            RoutingBalance(),
            MetricsLogger(),
            Evaluator(),
            Checkpointer(),
            Exporter(),
        ]
        self.loss_terms: list[LossTerm] = []
        self.task_loss_weight = 1.0
        self.state = TrainState()
        self._observer: RouterObserver | None = None
        self._last_checkpoint_step = -1
        self._created_at = time.monotonic()  # train.stop_after_time counts from here

    # -- what callbacks call ---------------------------------------------------------------------------------------
    def add_loss_term(self, term: LossTerm) -> None:
        if any(t.name == term.name for t in self.loss_terms):
            raise ValueError(f"a loss term named '{term.name}' is already registered; give each term its own name")
        self.loss_terms.append(term)

    def router_observer(self) -> RouterObserver:
        """The run's one router observer (hooks on every MoE router of the live model), made on first use."""
        if self._observer is None:
            self._observer = RouterObserver(self.engine.module)
        return self._observer

    def evaluate(self) -> dict[str, float]:
        """Per-domain validation loss of the live model (collective); logged, kept in ``result.validation``."""
        cfg, info, split = self.cfg, self.info, self.val_split
        if cfg.parallel.ep_size > 1:
            # Every forward is an all-to-all over the expert-parallel group: all ranks must run the same number of
            # micro-batches, so drop the last len % world rows (at most world - 1).
            keep = len(split) - len(split) % info.world_size
            split = PackedSplit(split.input_ids_NT[:keep], split.domain_ids_NT[:keep])
        results = evaluate_by_domain(
            self.engine.module,
            split,
            self.prepared.domains,
            cfg.train.micro_batch_size,
            cfg.train.eval_batches,
            info.rank,
            info.world_size,
            self.engine.device,
        )
        self.result.validation = results
        self.sink.log(self.state.step, {f"val/{k}": v for k, v in results.items()})
        for callback in self.callbacks:
            callback.on_evaluate(self, results)
        return results

    def save_checkpoint(self) -> Path | None:
        """Collective: checkpoint the current step (once per step), with every callback's state."""
        if self._last_checkpoint_step == self.state.step:
            return None
        states = {c.name: c.state_dict() for c in self.callbacks if c.name}
        target = checkpointing.save(
            self.engine,
            self.run_dir / "checkpoints",
            self.state,
            self.info.is_main,
            self.cfg.train.keep_checkpoints,
            self.layout.to_json(),
            callback_state={name: state for name, state in states.items() if state},
        )
        self.result.checkpoint, self._last_checkpoint_step = target, self.state.step
        for callback in self.callbacks:
            callback.on_save(self, target)
        return target

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._setup()
        self._fit()
        return self.result

    def _setup(self) -> None:
        cfg = self.cfg
        self.info = info = init_distributed(cfg.engine.backend)
        validate_engine(cfg.engine, info.accelerator)
        validate_train(cfg.train)
        self.family = family = resolve_family(cfg.model)  # fails fast on a bad model.path before data work starts
        if cfg.parallel.ep_size != 1:
            validate_expert_parallel(
                cfg.parallel.ep_size, info.world_size, family.model_type, num_routed_experts(cfg.model),
                cfg.engine.zero_stage,
            )  # fmt: skip
        # Resume point and layout check before any work: a checkpoint this run cannot load stops here.
        checkpoint_root = self.run_dir / "checkpoints"
        resume_from = _resume_point(cfg, checkpoint_root)
        self.layout = Layout(cfg.parallel.ep_size, info.world_size, cfg.engine.zero_stage, family.model_type)
        saved_layout, convert = None, False
        if resume_from is not None:
            checkpointing.require_complete(resume_from)
            saved_layout = read_layout(resume_from)
            convert = relayout.plan_resume(saved_layout, self.layout, resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.require_shared(checkpoint_root, resume_from)  # every node the same run directory

        self.prepared, data = _prepare_data_once(cfg, info)
        if data is not cfg.data:  # the run's own config from here on (the caller's is left as it was)
            self.cfg = cfg = dataclasses.replace(cfg, data=data)
        self.tokenizer = self.prepared.load_tokenizer()
        self.train_split = PackedSplit.from_dataset(self.prepared.load_split("train"))
        self.val_split = PackedSplit.from_dataset(self.prepared.load_split("validation"))
        self.sampler = StepSampler(
            len(self.train_split), cfg.train.micro_batch_size, cfg.train.grad_accum, info.world_size, info.rank,
            cfg.train.seed,
        )  # fmt: skip
        self.tokens_per_step = self.sampler.global_batch * self.train_split.input_ids_NT.shape[1]

        model = build_model(
            cfg.model, len(self.tokenizer), cfg.train.seed, token_ids=tokenizer_token_ids(self.tokenizer)
        )
        for callback in self.callbacks:
            callback.on_model_built(self, model)
        universal, relaid = None, None
        if convert:
            relayout.require_relayable(model, saved_layout, self.layout)
        if convert and self.layout.zero_stage == 0:  # ZeRO 0 at another ep_size: Connito re-lays it after initialize
            relaid = partial(
                relayout_zero0.load,
                checkpoint=resume_from,
                target=relayout_zero0.folder_for(resume_from, self.layout.ep_size, self.layout.world_size),
                hf_names=set(model.state_dict()),
                layout=family.layout,
                is_main=info.is_main,
            )
        elif convert:  # rank 0 converts once; the others wait
            universal = relayout.prepare_universal(resume_from, saved_layout, self.layout, family.layout, info.is_main)
        self.engine, self.scheduler = build_engine(model, cfg, info, family.model_type, universal is not None)
        self.sink = MetricsSink(
            self.run_dir, info.is_main, cfg.logging.wandb, cfg.logging.wandb_project, cfg.run.name, asdict(cfg)
        )
        self.result = TrainResult(
            run_dir=self.run_dir,
            steps_done=0,
            finished=False,
            model=self.engine.module,
            engine=self.engine,
            trainer=self,
        )
        if cfg.train.nonfinite_loss == "skip" and not can_skip_update(self.engine.optimizer):
            raise ValueError(
                f"train.nonfinite_loss=skip cannot drop an update of {type(self.engine.optimizer).__name__} "
                "(ZeRO 3 or the bf16 optimizer at ZeRO 0): use engine.zero_stage 0 (fp32), 1 or 2, or "
                "train.nonfinite_loss=stop"
            )
        for callback in self.callbacks:
            callback.on_engine_built(self)

        if resume_from is not None:
            self.state = checkpointing.load(self.engine, resume_from, universal=universal, relaid=relaid)
            self.sink.truncate_after(self.state.step)
            saved = checkpointing.load_callback_state(resume_from)
            for callback in self.callbacks:
                if callback.name in saved:
                    callback.load_state_dict(saved[callback.name])
                callback.on_load(self, resume_from)
            self._last_checkpoint_step = self.state.step
            if info.is_main:
                log.info("resumed from %s at step %d", resume_from, self.state.step)
        self.result.steps_done = self.state.step

    @property
    def _clip(self):
        """Connito's gradient clipping where DeepSpeed's is wrong (ZeRO 0 under expert parallelism), else None."""
        if self.cfg.optim.grad_clip > 0 and connito_clips(self.cfg.engine, self.cfg.parallel):
            return partial(clip_grad_norm_expert_parallel_, self.engine.module, self.cfg.optim.grad_clip)
        return None

    def _before_forward(self, batch: MicroBatch) -> float:
        for callback in self.callbacks:
            callback.on_micro_batch(self, batch)
        return self.task_loss_weight

    def _fit(self) -> None:
        cfg, state = self.cfg, self.state
        for callback in self.callbacks:
            callback.on_train_start(self)
        started_step = state.step
        limit_s = parse_duration(cfg.train.stop_after_time)
        time_slice = TimeSlice(limit_s, started_at=self._created_at) if limit_s else None
        if time_slice is not None:
            time_slice.start_loop()
        self.engine.train()
        while state.step < cfg.train.steps:
            losses = train_step(
                self.engine, self.train_split, self.sampler, state.step, self.loss_terms, self.engine.device,
                before_forward=self._before_forward, clip=self._clip, nonfinite=cfg.train.nonfinite_loss,
                domain_names=self.prepared.domains,
            )  # fmt: skip
            if losses.pop("skipped", 0.0):
                state.skipped_steps += 1
                log.warning("step %d skipped: non-finite loss (train.nonfinite_loss=skip)", state.step + 1)
            if cfg.train.nonfinite_loss == "skip":
                losses["skipped_steps"] = float(state.skipped_steps)  # logged as train/skipped_steps
            state.step += 1
            state.tokens_seen += self.tokens_per_step
            for callback in self.callbacks:
                callback.on_step_end(self, losses)
            if state.step >= cfg.train.steps:
                break
            if cfg.train.stop_after and state.step - started_step >= cfg.train.stop_after:
                self.result.stopped_by = "train.stop_after"
                break
            if time_slice is not None and time_slice.over(self.info.world_size, self.engine.device):
                self.result.stopped_by = "train.stop_after_time"
                break
        self.result.steps_done = state.step
        self.result.finished = state.step >= cfg.train.steps
        for callback in self.callbacks:
            callback.on_train_end(self)
        self.sink.close()
        if self.info.is_main:
            write_status(
                self.run_dir,
                {
                    "finished": self.result.finished,
                    "step": state.step,
                    "steps": cfg.train.steps,
                    "started_step": started_step,
                    "stopped_by": None if self.result.finished else self.result.stopped_by,
                    "checkpoint": str(self.result.checkpoint) if self.result.checkpoint else None,
                },
            )
        if not self.result.finished and self.info.is_main:
            log.info(
                "stopped at step %d of %d (%s); the same command resumes from %s",
                state.step, cfg.train.steps, self.result.stopped_by, self.result.checkpoint,
            )  # fmt: skip


def run_training(cfg: ConnitoConfig, run_dir: Path, callbacks: list[Callback] | None = None) -> TrainResult:
    """Train as ``cfg`` says, writing into ``run_dir``; ``callbacks`` are added to those the config names."""
    return Trainer(cfg, run_dir, callbacks).run()
