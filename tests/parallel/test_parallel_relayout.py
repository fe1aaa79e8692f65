"""Checkpoints resume across expert-parallel layouts (gloo, CPU): ZeRO 1/2 through DeepSpeed universal
checkpoints, ZeRO 0 through Connito's own re-layout (:mod:`connito.training.relayout_zero0`).

One ep 2 run on 2 ranks (ZeRO-1) writes checkpoints at steps 2 and 4; each test copies its run directory, keeps
the step-2 checkpoint and resumes it under another layout. The worker dumps the full transformers state dict
right after every save and right after the resume's load, so "identical parameters" is checked tensor by tensor
over every expert in global numbering.
"""

import json
import shutil

import pytest
import torch

from connito.training.relayout import CheckpointLayoutError, plan_resume
from connito.training.run_state import Layout
from tests.helpers import REPO, compose_train, small_overrides, torchrun

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "parallel" / "relayout_worker.py"
COMMON = [
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=0",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.export=false",
    "optim.warmup_steps=1",  # full learning rate after step 1: a lost AdamW state shows in the step-4 loss
    "engine=zero1",
]


def train(run_dir, dump_dir, nproc: int, cache, overrides: list[str]) -> None:
    args = [str(run_dir), str(dump_dir), *small_overrides(cache), *COMMON, *overrides]
    proc = torchrun(nproc, WORKER, args)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.fixture(scope="session")
def ep2_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("relayout")
    train(root / "run", root / "dump", 2, data_cache, ["parallel.ep_size=2"])
    return root


@pytest.fixture(scope="session")
def ep2_zero0_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("relayout-zero0")
    train(root / "run", root / "dump", 2, data_cache, ["parallel.ep_size=2", "engine=zero0"])
    return root


def resume(ep2_run, tmp_path, cache, nproc: int, overrides: list[str], step: int = 2):
    """Copy the ep 2 run, keep its checkpoint at ``step``, resume it under ``overrides``."""
    run_dir = tmp_path / "run"
    shutil.copytree(ep2_run / "run", run_dir)
    checkpoints = run_dir / "checkpoints"
    for later in checkpoints.glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(f"step_{step:06d}")
    train(run_dir, tmp_path / "dump", nproc, cache, overrides)
    return run_dir, tmp_path / "dump"


def assert_identical(expected: dict, actual: dict) -> None:
    assert set(actual) == set(expected)
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different


def assert_same_next_losses(reference_run, resumed_run) -> None:
    """Steps 3 and 4 after a resume at step 2 follow the original run: the AdamW state came along."""
    reference, resumed = losses(reference_run), losses(resumed_run)
    assert len(resumed) == 4
    torch.testing.assert_close(
        torch.tensor(resumed[2:], dtype=torch.float64),
        torch.tensor(reference[2:], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


def test_the_checkpoint_records_its_layout(ep2_run):
    state = json.loads((ep2_run / "run" / "checkpoints" / "step_000002" / "connito_state.json").read_text())
    assert state["layout"] == {"ep_size": 2, "world_size": 2, "zero_stage": 1, "model_type": "qwen3_moe"}


def test_ep2_checkpoint_resumes_at_ep1_on_2_ranks_with_identical_parameters_and_next_losses(
    ep2_run, tmp_path, data_cache
):
    run_dir, dump = resume(ep2_run, tmp_path, data_cache, 2, ["parallel.ep_size=1"])
    assert_identical(torch.load(ep2_run / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))
    universal = run_dir / "checkpoints" / "step_000002" / "universal"
    assert (universal / "CONVERTED").is_file()
    # Same rows per step (dp 2 either way): continuing at ep 1 follows the ep 2 run, AdamW state included.
    assert_same_next_losses(ep2_run / "run", run_dir)
    new = json.loads((run_dir / "checkpoints" / "step_000004" / "connito_state.json").read_text())
    assert new["layout"]["ep_size"] == 1


@pytest.mark.slow  # ~12 s; the default run keeps the 2-rank resume, which checks the next losses too
def test_ep2_checkpoint_resumes_at_ep1_on_1_rank_with_identical_parameters(ep2_run, tmp_path, data_cache):
    _, dump = resume(ep2_run, tmp_path, data_cache, 1, ["parallel.ep_size=1", "train.micro_batch_size=8"])
    assert_identical(torch.load(ep2_run / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))


@pytest.mark.slow  # ~20-55 s; the default run keeps a lighter test of the same path
def test_ep2_checkpoint_resumes_at_ep4_on_4_ranks_with_identical_parameters(ep2_run, tmp_path, data_cache):
    """8 experts: 2 per rank at ep 4. Half the micro-batch keeps the global batch."""
    run_dir, dump = resume(ep2_run, tmp_path, data_cache, 4, ["parallel.ep_size=4", "train.micro_batch_size=2"])
    assert_identical(torch.load(ep2_run / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))
    assert len(losses(run_dir)) == 4


@pytest.mark.slow  # ~20-55 s; the default run keeps a lighter test of the same path
def test_ep1_checkpoint_resumes_at_ep2_under_zero2_with_identical_parameters(tmp_path, data_cache):
    """The other direction (transformers names -> AutoEP shards), with a ZeRO stage change on the way."""
    train(tmp_path / "run", tmp_path / "ep1", 2, data_cache, ["parallel.ep_size=1", "train.steps=2"])
    train(tmp_path / "run", tmp_path / "ep2", 2, data_cache, ["parallel.ep_size=2", "train.steps=2", "engine=zero2"])
    assert_identical(torch.load(tmp_path / "ep1" / "saved_step2.pt"), torch.load(tmp_path / "ep2" / "loaded.pt"))


# -- ZeRO 0: Connito's own re-layout ------------------------------------------------------------------------


def test_zero0_ep2_checkpoint_resumes_at_ep1_on_2_ranks_with_identical_parameters_and_adam_state(
    ep2_zero0_run, tmp_path, data_cache
):
    run_dir, dump = resume(ep2_zero0_run, tmp_path, data_cache, 2, ["parallel.ep_size=1", "engine=zero0"])
    assert_identical(torch.load(ep2_zero0_run / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))
    assert (run_dir / "checkpoints" / "step_000002" / "relayout-ep1-world2" / "CONVERTED").is_file()
    assert_same_next_losses(ep2_zero0_run / "run", run_dir)
    new = json.loads((run_dir / "checkpoints" / "step_000004" / "connito_state.json").read_text())
    assert new["layout"]["ep_size"] == 1 and new["optimizer_params"]


@pytest.mark.slow  # ~13 s; the default run keeps the 2-rank resume, which checks the AdamW state too
def test_zero0_ep2_checkpoint_resumes_at_ep1_on_1_rank(ep2_zero0_run, tmp_path, data_cache):
    overrides = ["parallel.ep_size=1", "engine=zero0", "train.micro_batch_size=8"]
    run_dir, dump = resume(ep2_zero0_run, tmp_path, data_cache, 1, overrides)
    assert_identical(torch.load(ep2_zero0_run / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))
    assert_same_next_losses(ep2_zero0_run / "run", run_dir)


@pytest.mark.slow  # ~20-55 s; the default run keeps a lighter test of the same path
def test_zero0_ep2_checkpoint_resumes_at_ep4_on_4_ranks(ep2_zero0_run, tmp_path, data_cache):
    overrides = ["parallel.ep_size=4", "engine=zero0", "train.micro_batch_size=2"]
    run_dir, dump = resume(ep2_zero0_run, tmp_path, data_cache, 4, overrides)
    assert_identical(torch.load(ep2_zero0_run / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))
    assert_same_next_losses(ep2_zero0_run / "run", run_dir)


@pytest.mark.slow  # ~20-55 s; the default run keeps a lighter test of the same path
def test_zero0_ep1_checkpoint_resumes_at_ep2(tmp_path, data_cache):
    """The other direction: transformers names -> AutoEP shards."""
    source = tmp_path / "ep1"
    train(source / "run", source / "dump", 2, data_cache, ["parallel.ep_size=1", "engine=zero0"])
    run_dir, dump = resume(source, tmp_path / "ep2", data_cache, 2, ["parallel.ep_size=2", "engine=zero0"])
    assert_identical(torch.load(source / "dump" / "saved_step2.pt"), torch.load(dump / "loaded.pt"))
    assert_same_next_losses(source / "run", run_dir)


# -- what is refused, and what needs no conversion -------------------------------------------------------------


def test_moving_between_zero0_and_zero1_or_2_is_refused_with_the_fix(tmp_path):
    with pytest.raises(CheckpointLayoutError) as error:
        plan_resume(Layout(2, 2, 0, "qwen3_moe"), Layout(1, 2, 1, "qwen3_moe"))
    message = str(error.value)
    assert "ep_size 2" in message and "ep_size 1" in message and "ZeRO stage 0 and ZeRO stage 1/2" in message
    assert "engine.zero_stage=0" in message
    with pytest.raises(CheckpointLayoutError, match="engine.zero_stage=1"):
        plan_resume(Layout(2, 2, 1, "qwen3_moe"), Layout(1, 2, 0, "qwen3_moe"))
    with pytest.raises(CheckpointLayoutError, match="'qwen3_moe' model, this run builds 'mixtral'"):
        plan_resume(Layout(2, 2, 1, "qwen3_moe"), Layout(2, 2, 1, "mixtral"))
    # ZeRO 0 at another ep_size needs the optimizer's parameter names, recorded since the re-layout exists
    (tmp_path / "connito_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(CheckpointLayoutError, match="does not record its optimizer's parameter names"):
        plan_resume(Layout(2, 2, 0, "qwen3_moe"), Layout(1, 2, 0, "qwen3_moe"), tmp_path)
    assert plan_resume(Layout(2, 2, 0, "qwen3_moe"), Layout(1, 2, 0, "qwen3_moe"))


def test_layouts_deepspeed_loads_directly_are_not_converted():
    assert not plan_resume(None, Layout(2, 2, 1, "qwen3_moe"))  # written before layouts were recorded
    assert not plan_resume(Layout(2, 2, 1, "qwen3_moe"), Layout(2, 2, 1, "qwen3_moe"))
    assert not plan_resume(Layout(2, 4, 0, "qwen3_moe"), Layout(2, 2, 0, "qwen3_moe"))  # ZeRO 0: replicated state
    assert plan_resume(Layout(2, 4, 1, "qwen3_moe"), Layout(2, 2, 1, "qwen3_moe"))  # ZeRO shards: repartition
    assert plan_resume(Layout(1, 2, 1, "qwen3_moe"), Layout(1, 2, 2, "qwen3_moe"))


def fake_checkpoint(run_dir, zero_stage: int) -> None:
    """A complete-looking step-2 checkpoint written at ep 2 on 2 ranks: all the layout check reads."""
    checkpoint = run_dir / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("")
    layout = {"ep_size": 2, "world_size": 2, "zero_stage": zero_stage, "model_type": "qwen3_moe"}
    (checkpoint / "connito_state.json").write_text(json.dumps({"step": 2, "tokens_seen": 0, "layout": layout}))
    (checkpoint.parent / "latest").write_text(checkpoint.name)


def test_the_trainer_refuses_before_any_data_work(tmp_path):
    from connito.training.trainer import run_training

    fake_checkpoint(tmp_path / "run", zero_stage=0)
    cfg = compose_train(small_overrides(tmp_path / "cache"))
    with pytest.raises(CheckpointLayoutError, match="cannot be resumed at ep_size 1, world size 1"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_a_lean_run_is_not_re_laid_and_the_error_names_the_saved_layout(tmp_path, data_cache):
    """Lean experts keep each rank's trainable experts (and their AdamW state) in slots shaped by the layout."""
    from connito.training.trainer import run_training

    fake_checkpoint(tmp_path / "run", zero_stage=1)
    cfg = compose_train(small_overrides(data_cache) + ["engine=zero1", "+callbacks.trainable.experts=[[0,1]]"])
    with pytest.raises(CheckpointLayoutError) as error:
        run_training(cfg, tmp_path / "run")
    message = str(error.value)
    assert "trains lean experts" in message and "parallel.ep_size=2 engine.zero_stage=1 on 2 ranks" in message
    assert "callbacks.trainable.lean=false" in message
