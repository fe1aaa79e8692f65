"""Engine settings DeepSpeed cannot honour stop before any work, with the fix in the message."""

import pytest

from connito.training.config import EngineConfig, OptimConfig, TrainConfig
from connito.training.deepspeed_config import EngineConfigError, build_deepspeed_config, validate_engine


@pytest.mark.parametrize(
    ("engine", "accelerator", "message"),
    [
        (EngineConfig(zero_stage=4), "cpu", r"engine.zero_stage=4 does not exist: use 0, 1, 2 or 3"),
        (EngineConfig(precision="fp16"), "cpu", r"engine.precision='fp16' is not supported: use fp32 or bf16"),
        (
            EngineConfig(zero_stage=3, offload_optimizer=True),
            "cuda",
            r"engine.zero_stage=3 with engine.offload_optimizer=true is not supported",
        ),
        (EngineConfig(zero_stage=0, offload_optimizer=True), "cuda", r"offload_optimizer=true needs ZeRO"),
        (
            EngineConfig(zero_stage=2, offload_optimizer=True),
            "cpu",
            r"on the CPU accelerator everything is already in host memory",
        ),
    ],
)
def test_bad_engine_settings_are_refused(engine, accelerator, message):
    with pytest.raises(EngineConfigError, match=message):
        validate_engine(engine, accelerator)


def test_deepspeed_config_carries_batch_clip_and_stage():
    config = build_deepspeed_config(
        EngineConfig(zero_stage=2, precision="bf16"),
        OptimConfig(grad_clip=0.5),
        TrainConfig(micro_batch_size=4, grad_accum=3),
        world_size=2,
    )
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2}
    assert config["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    ("stage", "ep_size", "deepspeed_clips"), [(0, 1, True), (0, 2, False), (1, 2, True), (2, 2, True)]
)
def test_connito_clips_zero0_expert_parallel_runs_itself(stage, ep_size, deepspeed_clips):
    """ZeRO 0 under expert parallelism: DeepSpeed 0.19.8 would clip by the mean of per-rank norms, so the config
    leaves clipping to Connito (connito.parallel.grad_clip); everywhere else DeepSpeed clips."""
    from connito.training.config import ParallelConfig
    from connito.training.deepspeed_config import connito_clips

    engine, parallel = EngineConfig(zero_stage=stage), ParallelConfig(ep_size=ep_size)
    config = build_deepspeed_config(
        engine, OptimConfig(grad_clip=0.5), TrainConfig(), world_size=2, parallel=parallel, model_type="qwen3_moe"
    )
    assert ("gradient_clipping" in config) == deepspeed_clips
    assert connito_clips(engine, parallel) == (not deepspeed_clips)
