"""Every YAML under configs/ composes into the typed config, and every model config builds a working model."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from connito.cli.paths import config_dir
from connito.models.loading import build_model
from connito.training.config import ConnitoConfig
from tests.helpers import compose_train

CONFIGS = Path(config_dir())
PRIMARY = {"train.yaml": "train", "data_prepare.yaml": "data_prepare"}
GROUP_FILES = sorted(p.relative_to(CONFIGS) for p in CONFIGS.glob("*/*.yaml"))


def test_every_yaml_is_covered_by_this_test():
    top_level = {p.name for p in CONFIGS.glob("*.yaml")}
    assert top_level == set(PRIMARY), "a new primary config needs an entry in PRIMARY"
    assert GROUP_FILES, "no config groups found"


@pytest.mark.parametrize("name", sorted(PRIMARY.values()))
def test_primary_configs_compose(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name)
    OmegaConf.to_object(cfg)  # typed: raises on a wrong type or unknown key


@pytest.mark.parametrize("relative", GROUP_FILES, ids=str)
def test_group_option_composes_into_the_typed_train_config(relative):
    group, option = relative.parent.as_posix(), relative.stem
    cfg = compose_train([f"{group}={option}"])
    assert isinstance(cfg, ConnitoConfig)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_model_config_builds_a_model_that_runs_forward_and_backward(option):
    cfg = compose_train([f"model={option}"]).model
    model = build_model(
        cfg, vocab_size=300, seed=0, token_ids={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    )
    input_ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=input_ids, labels=input_ids)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (2, 16, 300)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "embed" in n)


def test_an_unknown_key_is_refused():
    with pytest.raises(Exception, match="Could not override 'train.stepz'"):
        compose_train(["train.stepz=3"])
