"""Every YAML under configs/ composes into its command's typed config with exactly the values it sets, and every
model config builds a model that carries its config, starts near uniform and trains every parameter."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from connito.cli.command import Command, discover
from connito.cli.paths import config_dir
from connito.models.loading import build_model
from tests.helpers import compose_train

CONFIGS = Path(config_dir())
COMMANDS = discover()
PRIMARY = {command.config_name: command for command in COMMANDS if command.config_dir is None}
GROUP_FILES = sorted(p.relative_to(CONFIGS) for p in CONFIGS.glob("*/*.yaml"))
MODEL_OPTIONS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def yaml_of(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def default_groups(command: Command) -> set[str]:
    """The config groups named in the ``defaults`` list of a command's primary YAML."""
    entries = yaml_of(CONFIGS / f"{command.config_name}.yaml").get("defaults", [])
    return {key.split("@")[0].removeprefix("optional ") for e in entries if isinstance(e, dict) for key in e}


def compose_typed(command: Command, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=command.config_name, overrides=overrides)
    return OmegaConf.to_object(cfg)


def assert_carries(expected: dict, typed, where: str) -> None:
    """Every key ``expected`` (a YAML mapping) sets has that value in ``typed`` (a dataclass or dict)."""
    for key, value in expected.items():
        actual = typed[key] if isinstance(typed, dict) else getattr(typed, key)
        if isinstance(value, str) and "${" in value:  # an interpolation: composition resolves it
            assert isinstance(actual, str) and "${" not in actual, f"{where}.{key}: {value!r} left unresolved"
            continue
        if isinstance(value, dict) and dataclasses.is_dataclass(actual):
            assert_carries(value, actual, f"{where}.{key}")
        else:
            actual = list(actual) if isinstance(actual, tuple) else actual
            assert actual == value, f"{where}.{key}: the YAML sets {value!r}, the typed config holds {actual!r}"


def test_every_yaml_is_covered_by_this_test():
    top_level = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert top_level == set(PRIMARY), "each configs/<name>.yaml is the primary config of one command and vice versa"
    assert GROUP_FILES, "no config groups found"
    used = set().union(*(default_groups(command) for command in PRIMARY.values()))
    unused = {p.parent.as_posix() for p in GROUP_FILES} - used
    assert not unused, f"config groups no command's defaults list names: {sorted(unused)}"


@pytest.mark.parametrize("command", PRIMARY.values(), ids=lambda command: command.config_name)
def test_primary_config_composes_into_its_schema_with_the_values_it_sets(command):
    own = yaml_of(CONFIGS / f"{command.config_name}.yaml")
    assert own["defaults"][0] == command.schema_name, "the defaults list starts with the command's typed schema"
    cfg = compose_typed(command, [])
    assert type(cfg) is command.schema
    assert_carries({k: v for k, v in own.items() if k not in ("defaults", "hydra")}, cfg, command.config_name)


@pytest.mark.parametrize(
    ("relative", "command"),
    [
        (relative, command)
        for relative in GROUP_FILES
        for command in PRIMARY.values()
        if relative.parent.as_posix() in default_groups(command)
    ],
    ids=lambda x: str(x) if isinstance(x, Path) else x.config_name,
)
def test_group_option_composes_into_the_typed_config_with_the_values_it_sets(relative, command):
    group, option = relative.parent.as_posix(), relative.stem
    typed = compose_typed(command, [f"{group}={option}"])
    if (CONFIGS / relative).read_text().startswith("# @package _global_"):  # sets keys from the root, e.g. `x: null`
        own = {k: v for k, v in yaml_of(CONFIGS / relative).items() if k not in ("defaults", "hydra")}
        assert_carries(own, typed, f"connito {command.name} {group}={option}")
        return
    for part in group.split("/"):
        typed = getattr(typed, part)
    assert_carries(yaml_of(CONFIGS / relative), typed, f"connito {command.name} {group}={option}: {group}")


@pytest.mark.parametrize("option", MODEL_OPTIONS)
def test_model_config_builds_a_model_that_starts_uniform_and_trains_every_parameter(option):
    yaml = yaml_of(CONFIGS / "model" / f"{option}.yaml")
    cfg = compose_train([f"model={option}"]).model
    vocab, token_ids = 300, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    model = build_model(cfg, vocab_size=vocab, seed=0, token_ids=token_ids)

    assert model.config.model_type == yaml["family"]
    assert model.config.vocab_size == vocab
    for key, value in {**yaml["hf_config"], **token_ids}.items():
        assert getattr(model.config, key) == value, f"model.config.{key}"

    # 1024 tokens: enough that, at this seed, the router of every MoE layer sends some to every expert
    input_ids = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (8, 128, vocab)
    assert abs(out.loss.item() - math.log(vocab)) < 0.5, "a fresh model predicts about uniformly"
    out.loss.backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.count_nonzero() > 0, f"{name} gets no gradient"
        if ".experts." in name and param.dim() == 3:  # fused expert weights [E, ...]: one slice per expert
            starved = (param.grad.flatten(1) == 0).all(1).nonzero().flatten().tolist()
            assert not starved, f"{name}: experts {starved} get no gradient"


def test_an_unknown_key_is_refused():
    with pytest.raises(Exception, match="Could not override 'train.stepz'"):
        compose_train(["train.stepz=3"])


PIPELINES = ("btx", "flexolmo", "groups", "federated", "quickstart")
PIPELINE_BASE = CONFIGS / "pipeline" / "base.yaml"


def dotted(mapping: dict, prefix: str = "") -> dict:
    """``{"a.b": leaf}`` of a nested mapping."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_each_pipeline_composes_the_shared_settings_of_the_one_base_and_repeats_none(name):
    base, own = yaml_of(PIPELINE_BASE), yaml_of(CONFIGS / f"{name}.yaml")
    assert {"pipeline": "base"} in own["defaults"], f"configs/{name}.yaml does not name pipeline: base"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    shared = dotted({k: v for k, v in base.items() if k != "defaults"})
    assert shared, "the base sets nothing"
    for key, value in shared.items():
        assert OmegaConf.select(cfg, key) == value, f"connito {name}: {key} is not the base's {value!r}"
    choices = cfg.hydra.runtime.choices
    for entry in base["defaults"]:
        ((group, option),) = entry.items()
        group = group.removeprefix("override ").removeprefix("/")
        assert choices[group] == option, f"connito {name}: {group}={choices[group]}, the base chooses {option}"
    repeated = set(shared) & set(dotted(own))
    assert not repeated, f"configs/{name}.yaml repeats {sorted(repeated)} of configs/pipeline/base.yaml"
    assert cfg.run.name and cfg.hydra.job.name, "each pipeline names its own run and job"
