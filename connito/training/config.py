"""Typed configs of the trainer (Hydra groups ``optim``, ``engine``) and the root config of ``connito train``."""

from dataclasses import dataclass, field
from typing import Any

from connito.data.config import DataConfig
from connito.models.config import ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 turns it off)."""


@dataclass
class EngineConfig:
    """The DeepSpeed engine: ZeRO stage, precision, communication backend."""

    zero_stage: int = 0
    """0, 1 or 2 everywhere; 3 without expert parallelism or optimizer offload."""
    precision: str = "fp32"
    """fp32 or bf16."""
    backend: str = "auto"
    """auto picks gloo on CPU (DS_ACCELERATOR=cpu) and nccl on CUDA; or name gloo / nccl."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer state to host memory (GPU runs, ZeRO 1/2)."""


@dataclass
class ParallelConfig:
    """Model parallelism beyond data parallelism (Hydra group ``parallel``)."""

    ep_size: int = 1
    """Expert parallelism through DeepSpeed AutoEP: each rank holds E / ep_size routed experts of every MoE layer
    (and their optimizer state); tokens reach their experts by a dropless all-to-all. 1 turns it off. The world
    size must be a multiple of ep_size; every rank still reads its own micro-batch (data parallel over all ranks)
    and expert gradients are reduced over the world_size / ep_size ranks holding the same experts."""


@dataclass
class TrainConfig:
    steps: int = 500
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    """Validation every N steps and at the end (0: only at the end)."""
    eval_batches: int = 0
    """Validation micro-batches per rank (0: the whole validation split)."""
    checkpoint_every: int = 250
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (0 keeps all)."""
    resume: str = "auto"
    """auto: continue from the run's latest complete checkpoint if there is one; never: start fresh
    (refuses a run directory that has checkpoints); or a path to a checkpoint directory."""
    export: bool = True
    """Write an HF save_pretrained export (safetensors + tokenizer) of the final model."""
    stop_after: int = 0
    """Stop (after checkpointing) once this many steps are done in this invocation; 0 = run to ``steps``.
    For step-counted slices and the resume tests; ``stop_after_time`` bounds an invocation's wall time."""
    stop_after_time: str = ""
    """Stop (after checkpointing) before this much wall time has passed in this invocation: ``3h50m``, ``45m``,
    ``5400`` (seconds); empty = no limit. The run stops after the last step that fits (judged by the mean step
    time), so leave room for the final checkpoint. For time-sliced jobs: ``launch/slurm.sbatch`` sets it from the
    SLURM job's time left and requeues the job until the run is finished (see connito.training.time_slice)."""
    nonfinite_loss: str = "stop"
    """What a NaN or inf training loss on any rank does. stop: every rank raises an error naming the step, the
    rank(s) and the micro-batch(es); skip: no rank applies that step's update (gradients dropped, parameters and
    optimizer state untouched, the learning-rate schedule not advanced) and ``train/skipped_steps`` counts them."""


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to wandb; offline (local files, ``wandb sync`` later) when no API key is configured."""
    wandb_project: str = "connito"
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class RunConfig:
    name: str = "quickstart"
    """The run directory is ``<root>/<name>``; rerunning the same name resumes it (train.resume=auto)."""
    root: str = "runs"


@dataclass
class ConnitoConfig:
    """Root config of ``connito train``."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plugins: list[str] = field(default_factory=list)
    """Python modules to import before the run: where your ``@register_callback`` (or ``register_family``) lines
    live, e.g. ``plugins='[my_pkg.methods]'``."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Callbacks to add to the run, in order: ``{name: {option: value}}``, each name registered with
    ``connito.training.callbacks.register_callback`` (in Connito or in a module listed under ``plugins``), e.g.
    ``connito train plugins='[my_pkg.methods]' +callbacks.my_method.coef=0.1`` (``+callbacks.my_method={}`` for no
    options)."""
