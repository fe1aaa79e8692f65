"""Turn Connito's typed configs into a DeepSpeed config dict, refusing combinations the engine cannot honour."""

from connito.parallel.expert_parallel import autoep_section
from connito.training.config import EngineConfig, OptimConfig, ParallelConfig, TrainConfig


class EngineConfigError(ValueError):
    """An engine setting DeepSpeed cannot honour here; the message names the fix."""


def validate_engine(engine: EngineConfig, accelerator: str) -> None:
    if engine.zero_stage not in (0, 1, 2, 3):
        raise EngineConfigError(f"engine.zero_stage={engine.zero_stage} does not exist: use 0, 1, 2 or 3")
    if engine.precision not in ("fp32", "bf16"):
        raise EngineConfigError(f"engine.precision='{engine.precision}' is not supported: use fp32 or bf16")
    if engine.offload_optimizer:
        if engine.zero_stage == 0:
            raise EngineConfigError(
                "engine.offload_optimizer=true needs ZeRO: set engine.zero_stage to 1, 2 or 3 (or turn offload off)"
            )
        if engine.zero_stage == 3:
            raise EngineConfigError(
                "engine.zero_stage=3 with engine.offload_optimizer=true is not supported by Connito: its HF export "
                "and checkpoint layout are tested for ZeRO-3 without offload. Use engine.zero_stage=2 with offload, "
                "or ZeRO-3 with engine.offload_optimizer=false"
            )
        if accelerator != "cuda":
            raise EngineConfigError(
                "engine.offload_optimizer=true moves optimizer state from the GPU to host memory; on the CPU "
                "accelerator everything is already in host memory. Set engine.offload_optimizer=false"
            )


def build_deepspeed_config(
    engine: EngineConfig,
    optim: OptimConfig,
    train: TrainConfig,
    world_size: int,
    parallel: ParallelConfig | None = None,
    model_type: str | None = None,
    load_universal: bool = False,
) -> dict:
    """The DeepSpeed config. ``train_batch_size`` counts every rank: under expert parallelism (AutoEP) each rank
    still runs the non-expert model on its own micro-batch, so the data-parallel degree is the world size.
    ``parallel.ep_size > 1`` adds AutoEP's ``"expert_parallel"`` section with the family's preset
    (validate first with :func:`connito.parallel.validate_expert_parallel`). ``load_universal``: the run resumes a
    checkpoint through its universal conversion (:mod:`connito.training.relayout`)."""
    zero: dict = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if engine.zero_stage == 3:
        # The HF export gathers full weights itself (connito.training.export); keep DS from writing a 16-bit copy.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # Connito logs metrics itself
        "wall_clock_breakdown": False,
    }
    if optim.grad_clip > 0 and not connito_clips(engine, parallel):
        config["gradient_clipping"] = optim.grad_clip
    if engine.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if parallel is not None and parallel.ep_size > 1:
        if model_type is None:
            raise ValueError("build_deepspeed_config needs the model_type for parallel.ep_size > 1")
        config["expert_parallel"] = autoep_section(model_type, parallel.ep_size)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def connito_clips(engine: EngineConfig, parallel: ParallelConfig | None) -> bool:
    """True where Connito clips the gradients itself instead of DeepSpeed: ZeRO 0 (fp32) under expert parallelism,
    where DeepSpeed 0.19.8 averages per-rank norms instead of taking the global one
    (:mod:`connito.parallel.grad_clip`)."""
    return engine.zero_stage == 0 and engine.precision == "fp32" and parallel is not None and parallel.ep_size > 1
