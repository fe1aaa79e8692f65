"""Balancing in training runs: DeepSeek-V3's bias update and sequence-wise loss, DeepSeek-V2's expert-level loss."""

import json

import pytest
import torch
from safetensors.torch import load_file

from connito.experts import ExpertView
from connito.training.callbacks import CallbackError
from connito.training.trainer import run_training
from tests.helpers import compose_train, small_overrides

V3 = ["model=deepseek_v3_tiny", "model.expert_bias_update_rate=0.01", "train.checkpoint_every=3"]


def biases(model) -> dict[int, torch.Tensor]:
    return {layer: block.choice_bias().detach().clone() for layer, block in ExpertView(model).blocks()}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_deepseek_v3_bias_moves_by_the_rate_is_exported_and_resumes_bit_for_bit(tmp_path, data_cache):
    base = small_overrides(data_cache) + V3 + ["train.steps=6", "train.eval_every=0"]
    straight = run_training(compose_train(base + ["train.export=true"]), tmp_path / "straight")
    bias_by_layer = biases(straight.model)
    for layer, bias_E in bias_by_layer.items():
        steps_E = bias_E / 0.01  # every step moves each entry by +-rate (or 0 at exactly the mean load)
        assert torch.allclose(steps_E, steps_E.round(), atol=1e-4) and steps_E.abs().max() <= 6 + 1e-4, layer
        assert bias_E.abs().sum() > 0, layer
    records = metrics(tmp_path / "straight")
    assert all(r["train/seq_balance_loss"] > 0 for r in records if "train/loss" in r)
    exported = {}
    for path in (tmp_path / "straight" / "hf").glob("*.safetensors"):
        exported.update(load_file(path))
    for layer, bias_E in bias_by_layer.items():
        assert torch.equal(exported[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"], bias_E)

    first = run_training(compose_train(base + ["train.export=false", "train.stop_after=3"]), tmp_path / "resumed")
    assert not first.finished
    resumed = run_training(compose_train(base + ["train.export=false"]), tmp_path / "resumed")
    for layer, bias_E in biases(resumed.model).items():
        assert torch.equal(bias_E, bias_by_layer[layer]), layer
    straight_state = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, straight_state[name]), name


def test_deepseek_v2_trains_its_expert_level_balance_loss(tmp_path, data_cache):
    overrides = small_overrides(data_cache) + ["model=deepseek_v2_tiny", "train.steps=2", "train.eval_every=0"]
    run_training(compose_train(overrides + ["train.export=false"]), tmp_path / "v2")
    records = [r for r in metrics(tmp_path / "v2") if "train/loss" in r]
    # logged as its own term (weighted by model.aux_loss_coef=0.001 in the loss); 1 at perfect balance, E at collapse
    assert records and all(0.5 < r["train/balance_loss"] < 8 for r in records)


def test_a_bias_update_on_a_family_without_a_choice_bias_is_refused(tmp_path, data_cache):
    overrides = small_overrides(data_cache) + ["model.expert_bias_update_rate=0.001", "train.steps=1"]
    with pytest.raises(CallbackError, match="no choice bias .*model.expert_bias_update_rate=0"):
        run_training(compose_train(overrides), tmp_path / "qwen")


def test_the_device_level_loss_without_expert_parallelism_is_refused(tmp_path, data_cache):
    overrides = small_overrides(data_cache) + ["model=deepseek_v2_tiny", "model.device_aux_loss_coef=0.05"]
    with pytest.raises(CallbackError, match=r"not defined at parallel.ep_size=1; run with parallel.ep_size>1"):
        run_training(compose_train(overrides + ["train.steps=1"]), tmp_path / "v2")
