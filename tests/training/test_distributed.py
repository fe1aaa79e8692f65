"""Data-parallel training on 2 gloo ranks under torchrun."""

import json

import pytest
import torch

from tests.helpers import REPO, small_overrides, torchrun

pytestmark = pytest.mark.distributed


def torchrun_worker(nproc: int, run_dir, overrides: list[str]):
    return torchrun(nproc, REPO / "tests" / "training" / "dist_worker.py", [str(run_dir), *overrides])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_ranks_learn_and_hold_identical_parameters(data_cache, tmp_path, zero_stage):
    overrides = small_overrides(data_cache) + [
        "train.steps=12",
        "train.eval_every=0",
        "train.export=false",
        f"engine=zero{zero_stage}",
    ]
    proc = torchrun_worker(2, tmp_path / "run", overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]

    digests = [json.loads((tmp_path / "run" / f"params_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0] == digests[1]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < curve[0] - 0.2, curve


def test_zero3_on_two_ranks_exports_the_model_it_trained(data_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from connito.data import prepare_data
    from connito.data.packed import PackedSplit
    from connito.training.evaluation import evaluate_by_domain
    from tests.helpers import compose_train

    overrides = small_overrides(data_cache) + [
        "train.steps=6",
        "train.eval_every=0",
        "train.eval_batches=0",
        "engine=zero3",
    ]
    proc = torchrun_worker(2, tmp_path / "run", overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]

    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["validation_loss"]
    prepared = prepare_data(compose_train(overrides).data, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", local_files_only=True)
    split = PackedSplit.from_dataset(prepared.load_split("validation"))
    recomputed = evaluate_by_domain(
        reloaded, split, prepared.domains, 4, 0, rank=0, world_size=1, device=torch.device("cpu")
    )
    assert recomputed == pytest.approx(measured, rel=1e-5)

    # The expert view refuses ZeRO-3's partitioned parameters with the fix, and reads them once gathered.
    from connito.experts import ExpertView

    refusal = json.loads((tmp_path / "run" / "params_rank0.json").read_text())["zero3_refusal"]
    assert refusal is not None and "partitioned by ZeRO-3 (engine.zero_stage=3)" in refusal
    assert "deepspeed.zero.GatheredParameters" in refusal
    gathered = torch.load(tmp_path / "run" / "zero3_expert.pt")
    view = ExpertView(reloaded)
    exported = view.read_expert((view.moe_layers[0], 0))
    assert all(torch.equal(gathered[name], exported[name]) for name in exported)


def test_a_callback_hooks_the_expert_parallel_model_once_the_engine_is_built(data_cache, tmp_path):
    """Under parallel.ep_size=2 the engine-built event sees AutoEP's swapped layers: the test callback's gradient
    hook sits on an AutoEP router, fires once per micro-batch on every rank, and its loss term is logged."""
    overrides = small_overrides(data_cache) + [
        "train.steps=3",
        "train.grad_accum=2",
        "train.eval_every=0",
        "train.export=false",
        "parallel.ep_size=2",
        "plugins=[tests.training.probe_callback]",
        "+callbacks.probe.coef=0.01",
    ]
    proc = torchrun_worker(2, tmp_path / "run", overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hooked = json.loads((tmp_path / "run" / "probe_hooked.json").read_text())
    assert hooked == {"block": "AutoEPMoEBlock", "ep_size": 2}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["probe/steps"] for r in steps] == [1, 2, 3]
    assert [r["probe/hook_calls"] for r in steps] == [2, 4, 6]
    assert all(r["train/probe_l2"] > 0 for r in steps)
