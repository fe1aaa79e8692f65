"""parallel.ep_size: the config, the DeepSpeed section it emits, and every refusal before work starts."""

import pytest
from packaging.version import Version

from connito.models import get_family, moe_families
from connito.parallel import ExpertParallelError, check_versions, num_routed_experts
from connito.parallel import validate_expert_parallel as validate
from connito.training.deepspeed_config import build_deepspeed_config
from tests.helpers import compose_train, run_cli, small_overrides


def test_ep_size_composes_and_defaults_to_off():
    assert compose_train([]).parallel.ep_size == 1
    assert compose_train(["parallel.ep_size=2"]).parallel.ep_size == 2


@pytest.mark.parametrize(
    "model_type, preset", [("qwen3_moe", "qwen3_moe"), ("qwen2_moe", "qwen3_moe"), ("deepseek_v3", "deepseek_v3")]
)
def test_deepspeed_config_carries_the_autoep_section_with_the_family_preset(model_type, preset):
    cfg = compose_train(["parallel.ep_size=2"])
    ds = build_deepspeed_config(cfg.engine, cfg.optim, cfg.train, 4, cfg.parallel, model_type)
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 2, "preset_model": preset}
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 4  # every rank reads its own micro-batch


def test_ep_size_1_emits_no_autoep_section():
    cfg = compose_train([])
    assert "expert_parallel" not in build_deepspeed_config(cfg.engine, cfg.optim, cfg.train, 2, cfg.parallel, "olmoe")


@pytest.mark.parametrize("model_type", ["olmoe", "flex_olmo"])
def test_olmoe_families_get_the_autoep_custom_pattern_and_no_preset(model_type):
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.module_inject.auto_ep_presets.registry import preset_name_for_hf_model_type

    cfg = compose_train(["parallel.ep_size=2"])
    section = build_deepspeed_config(cfg.engine, cfg.optim, cfg.train, 4, cfg.parallel, model_type)["expert_parallel"]
    assert "preset_model" not in section and section["moe_layer_pattern"] == r"model\.layers\.\d+\.mlp"
    parsed = parse_autoep_config(section)
    assert (parsed.score_func, parsed.score_apply, parsed.route_norm) == ("softmax", "post", None)  # norm_topk_prob
    assert parsed.expert_w3 is None and parsed.num_experts_attr == "num_experts"
    assert preset_name_for_hf_model_type(model_type) is None  # else AutoEP would take its preset over the pattern
    validate(2, 4, model_type, 8, 0, check_installed=False)


def test_every_mapped_preset_exists_in_the_installed_deepspeed():
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    for model_type in moe_families():
        autoep = get_family(model_type).autoep
        if model_type.startswith("connito_"):  # Connito's own model classes (BAM): refused, see test_composition_bam
            assert autoep is None, model_type
            continue
        assert autoep is not None, model_type  # every transformers MoE family runs expert parallel
        if autoep.preset is not None:
            assert autoep.preset in PRESET_MODELS
            assert model_type in PRESET_MODELS[autoep.preset].hf_model_types


def test_routed_experts_are_read_from_the_model_config():
    assert num_routed_experts(compose_train([]).model) == 8
    assert num_routed_experts(compose_train(["model=deepseek_v3_tiny"]).model) == 8


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(ep_size=3, world_size=3, num_experts=8), ["does not divide the 8 routed experts", "1, 2, 4, 8"]),
        (dict(ep_size=2, world_size=3), ["does not divide the world size 3", "multiple of 2"]),
        (dict(ep_size=2, model_type="gpt_oss"), ["family 'gpt_oss'", "no AutoEP mapping", "parallel.ep_size=1"]),
        (dict(ep_size=2, model_type="llama"), ["family 'llama'", "dense model (no experts to split)"]),
        (dict(ep_size=2, zero_stage=3), ["engine.zero_stage=3", "zero_stage=0, 1 or 2"]),
        (dict(ep_size=0), ["ep_size=0", "positive"]),
    ],
)
def test_bad_expert_parallel_settings_are_refused_with_the_fix(kwargs, words):
    args = dict(ep_size=2, world_size=4, model_type="qwen3_moe", num_experts=8, zero_stage=0) | kwargs
    with pytest.raises(ExpertParallelError) as err:
        validate(**args, check_installed=False)
    for word in words:
        assert word in str(err.value)


def test_ep_size_1_accepts_anything():
    validate(1, 3, "olmoe", 7, 3)


@pytest.mark.parametrize(
    "deepspeed, transformers, words",
    [
        ("0.19.7", "5.22.2", ["tested with deepspeed==0.19.8", "installed deepspeed==0.19.7"]),
        ("0.19.9", "5.22.2", ["deepspeed==0.19.9", "pip install 'deepspeed==0.19.8'"]),
        ("0.19.8", "5.23.0", ["transformers>=5.8,<5.23", "transformers==5.23.0"]),
        ("0.19.8", "5.7.0", ["transformers==5.7.0"]),
    ],
)
def test_untested_library_versions_are_refused(deepspeed, transformers, words):
    with pytest.raises(ExpertParallelError) as err:
        check_versions(Version(deepspeed), Version(transformers))
    for word in words + ["parallel.ep_size=1"]:
        assert word in str(err.value)


def test_installed_versions_are_in_range():
    check_versions()


def test_the_cli_refuses_before_preparing_data(tmp_path):
    cache = tmp_path / "cache"
    proc = run_cli(
        ["train", *small_overrides(cache), f"run.root={tmp_path}", "parallel.ep_size=2"], cwd=tmp_path, timeout=120
    )
    assert proc.returncode != 0
    assert "does not divide the world size 1" in proc.stderr + proc.stdout
    assert not cache.exists()
