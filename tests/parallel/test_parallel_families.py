"""Every family AutoEP serves: the HF export of an ep 2 run reproduces the trained model's logits, and an ep 2
checkpoint resumes at ep 1 (1 rank) and at ep 4 (4 ranks) with every parameter identical. (qwen3_moe has its own,
deeper tests beside this file.)

The default run covers one family with shared experts; the others run with the slow tests.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.parallel.test_parallel_ep import DEEPSEEK, Runs
from tests.parallel.test_parallel_relayout import assert_identical, train

pytestmark = pytest.mark.distributed

FAMILIES = {
    "qwen2_moe": ["model=qwen2_moe_tiny"],
    "mixtral": ["model=mixtral_tiny"],
    "deepseek_v2": ["model=deepseek_v2_tiny", "+model.hf_config.initializer_range=0.1"],
    "deepseek_v3": DEEPSEEK,
}
DEFAULT_RUN = {"deepseek_v3"}


def family_params():
    for name in sorted(FAMILIES):
        marks = () if name in DEFAULT_RUN else (pytest.mark.slow,)
        yield pytest.param(name, id=name, marks=marks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    return Runs(tmp_path_factory.mktemp("family-runs"), data_cache)


@pytest.mark.parametrize("family", family_params())
def test_hf_export_of_an_ep2_run_gives_the_trained_logits(runs, family):
    run = runs(2, [*FAMILIES[family], "parallel.ep_size=2"], export=True)
    saved = torch.load(run["dir"] / "logits.pt")
    model = AutoModelForCausalLM.from_pretrained(run["dir"] / "hf", dtype=torch.float32).eval()
    assert model.config.model_type == family
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ep2_checkpoints(tmp_path_factory, data_cache):
    """One ep 2 run per family (2 ranks, ZeRO-1, checkpoint at step 2), made on first use."""
    root, done = tmp_path_factory.mktemp("family-ep2"), {}

    def get(family: str):
        if family not in done:
            overrides = [*FAMILIES[family], "train.steps=2", "parallel.ep_size=2"]
            train(root / family / "run", root / family / "dump", 2, data_cache, overrides)
            done[family] = root / family
        return done[family]

    return get


def resume_params():
    for name in sorted(FAMILIES):
        yield pytest.param(name, 1, 1, id=f"{name}-ep1", marks=() if name in DEFAULT_RUN else (pytest.mark.slow,))
        yield pytest.param(name, 4, 4, id=f"{name}-ep4", marks=(pytest.mark.slow,))


@pytest.mark.parametrize(("family", "ep_size", "ranks"), resume_params())
def test_ep2_checkpoint_resumes_at_another_layout_with_identical_parameters(
    ep2_checkpoints, tmp_path, data_cache, family, ep_size, ranks
):
    source = ep2_checkpoints(family)
    saved = torch.load(source / "dump" / "saved_step2.pt")
    shutil.copytree(source / "run", tmp_path / "run")
    overrides = [*FAMILIES[family], "train.steps=3", f"parallel.ep_size={ep_size}"]
    train(tmp_path / "run", tmp_path / "dump", ranks, data_cache, overrides)
    assert_identical(saved, torch.load(tmp_path / "dump" / "loaded.pt"))


def test_deepseek_v2_trains_its_device_level_balance_loss_over_the_ep_ranks(runs):
    run = runs(2, [*FAMILIES["deepseek_v2"], "parallel.ep_size=2", "model.device_aux_loss_coef=0.05"])
    records = [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/device_balance_loss"] for r in records if "train/loss" in r]
    # over D=2 device groups: 1 when both ranks' experts get half the choices, D=2 when one rank gets them all
    assert len(losses) == len(run["loss"]) and all(0.5 < loss <= 2.0 + 1e-4 for loss in losses), losses
