"""The routing modes through `connito train`: the loss falls, the state survives a resume, the HF export loads in
plain transformers and Connito puts the trained route back on it; the Residual-MoE preset trains."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.experts import ExpertView
from connito.routing.routing_export import MANIFEST, SIDECAR, load_routing_mode
from connito.training.trainer import run_training
from tests.helpers import compose_train, run_cli, small_overrides

MODES = {
    "expert_choice": ["+callbacks.expert_choice.capacity_factor=1.0", "model.aux_loss_coef=0"],
    "expert_threshold": ["+callbacks.expert_threshold.capacity_factor=1.0"],
}


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train/tokens_per_s"} for line in lines]


def train_records(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "train/loss" in r]


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons of two runs in one process run single-threaded, as every other exactness test here
    does through its child processes (OMP_NUM_THREADS=1): with 2 intra-op threads the route predictor's logged loss
    differs between two identical straight runs by ~1e-7 (train/loss does not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base(data_cache):
    return small_overrides(data_cache) + ["train.eval_every=0", "train.checkpoint_every=0"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_run_trains_exports_and_the_trained_route_comes_back(mode, base, tmp_path):
    result = run_training(compose_train(base + MODES[mode] + ["train.steps=30"]), tmp_path / mode)
    curve = train_records(tmp_path / mode)
    first, last = curve[0]["train/loss"], sum(r["train/loss"] for r in curve[-5:]) / 5
    assert last < first - 0.3, f"{mode}: loss {first:.3f} -> {last:.3f}"
    if mode == "expert_choice":
        assert all(r["routing/max_load"] == 1.0 for r in curve)  # every expert exactly its capacity, every step
        assert all(r["routing/experts_per_token"] == 2.0 for r in curve)
        assert curve[-1]["train/route_predictor"] < curve[0]["train/route_predictor"]
    else:
        assert all(r["routing/max_load"] > 0 for r in curve)

    hf = result.export_dir
    assert (hf / SIDECAR).is_file() and json.loads((hf / MANIFEST).read_text())["options"]["mode"] == mode
    plain, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = result.model.eval()
    tokens = result.trainer.val_split.input_ids_NT[:2]
    with torch.no_grad():
        expected = trained(input_ids=tokens).logits
        top_k = plain.eval()(input_ids=tokens).logits
        routing = load_routing_mode(plain, hf)
        restored = plain(input_ids=tokens).logits
    torch.testing.assert_close(restored, expected, rtol=1e-4, atol=1e-4)
    assert (top_k - expected).abs().max() > 1e-3  # plain transformers routes top-k: another function
    routing.remove()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_resumed_run_routes_and_trains_as_a_straight_one(mode, base, tmp_path):
    common = base + MODES[mode] + ["train.steps=8", "train.checkpoint_every=4", "train.export=false"]
    run_training(compose_train(common), tmp_path / "straight")
    first = run_training(compose_train(common + ["train.stop_after=4"]), tmp_path / "resumed")
    assert not first.finished
    state = torch.load(next((tmp_path / "resumed" / "checkpoints").glob("step_000004/**/mp_rank_00_model_states.pt")))
    assert any("connito_routing" in key for key in state["module"])  # predictor / thresholds in the checkpoint
    run_training(compose_train(common), tmp_path / "resumed")
    assert train_records(tmp_path / "resumed") == train_records(tmp_path / "straight")


def test_the_residual_moe_preset_is_one_dense_mlp_plus_one_routed_expert(base, tmp_path):
    result = run_training(compose_train(base + ["model=residual_moe_tiny", "train.steps=20"]), tmp_path / "rmoe")
    view = ExpertView(result.model)
    assert view.top_k == 1 and view.moe_layers == list(range(view.num_layers))
    for layer in view.moe_layers:
        shared = view.shared_experts(layer)
        assert shared is not None and view.shared_expert_gate(layer) is None  # always on, ungated
        assert shared.down_proj.weight.shape == view.read_expert((layer, 0))["down_proj"].shape  # same width
    curve = train_records(tmp_path / "rmoe")
    assert curve[-1]["train/loss"] < curve[0]["train/loss"] - 0.3
    assert AutoModelForCausalLM.from_pretrained(result.export_dir).config.num_experts_per_tok == 1


def test_connito_train_on_the_command_line_with_expert_choice(data_cache, tmp_path):
    args = ["train", *small_overrides(data_cache), "train.steps=6", "train.eval_every=0", f"run.root={tmp_path}",
            "run.name=ec", "+callbacks.expert_choice.capacity_factor=1.0"]  # fmt: skip
    done = run_cli(args, cwd=tmp_path, DS_ACCELERATOR="cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ec" / "hf" / SIDECAR).is_file()
