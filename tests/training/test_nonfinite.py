"""train.nonfinite_loss: a NaN or inf loss stops the run naming step, rank and micro-batch (stop), or drops that
step's update on every rank and counts it (skip)."""

import json
import math

import pytest
import torch

from connito.training.step import NonFiniteLossError
from connito.training.trainer import Trainer
from tests.helpers import REPO, compose_train, small_overrides, torchrun


def overrides(data_cache, *extra: str) -> list[str]:
    return small_overrides(data_cache) + [
        "train.steps=5",
        "train.grad_accum=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.export=false",
        "plugins=[tests.training.nonfinite_callback]",
        *extra,
    ]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_names_step_rank_and_micro_batch(data_cache, tmp_path):
    cfg = compose_train(overrides(data_cache, "+callbacks.nonfinite.at_step=2", "+callbacks.nonfinite.micro_step=1"))
    assert cfg.train.nonfinite_loss == "stop"  # the default
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run()
    message = str(err.value)
    assert "non-finite training loss at step 3: rank 0 micro-batch 1 (loss nan)" in message
    assert "domains:" in message and "train.nonfinite_loss=skip" in message
    assert trainer.state.step == 2  # two steps done, the third never applied
    assert [r["step"] for r in records(tmp_path / "run") if "train/loss" in r] == [1, 2]


def test_skip_leaves_parameters_and_optimizer_state_bit_identical(data_cache, tmp_path):
    cfg = compose_train(
        overrides(
            data_cache,
            "train.nonfinite_loss=skip",
            "+callbacks.nonfinite.at_step=2",
            "+callbacks.nonfinite.value=inf",
            "+callbacks.nonfinite.snapshots=true",
        )
    )
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.run()
    assert result.finished and result.steps_done == 5 and trainer.state.skipped_steps == 1
    snaps = trainer.callbacks[0].snapshots
    before, after = snaps[2], snaps[3]  # after 2 steps; after the skipped third
    assert before["params"].keys() == after["params"].keys()
    assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
    assert len(before["optimizer"]) == len(after["optimizer"]) > 0
    for a, b in zip(before["optimizer"], after["optimizer"], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # training went on after it, with finite losses
    assert not all(torch.equal(after["params"][n], snaps[4]["params"][n]) for n in after["params"])
    assert all(torch.isfinite(p).all() for p in snaps[5]["params"].values())
    logged = [r for r in records(tmp_path / "run") if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in logged] == [0, 0, 1, 1, 1]
    assert math.isinf(logged[2]["train/nonfinite"]) and all(math.isfinite(r["train/loss"]) for r in logged)
    assert result.engine.skipped_steps == 1


def test_unknown_mode_is_refused(data_cache, tmp_path):
    cfg = compose_train(small_overrides(data_cache) + ["train.nonfinite_loss=ignore"])
    with pytest.raises(ValueError, match="train.nonfinite_loss='ignore' is not one of stop, skip"):
        Trainer(cfg, tmp_path / "run").run()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_skip_on_one_rank_is_skipped_by_both(data_cache, tmp_path, zero_stage):
    """Only rank 1's loss goes NaN; both ranks drop the update (the flag is all-reduced) and end identical."""
    run_dir = tmp_path / "run"
    args = overrides(
        data_cache, "train.nonfinite_loss=skip", f"engine=zero{zero_stage}", "+callbacks.nonfinite.at_step=1",
        "+callbacks.nonfinite.rank=1",
    )  # fmt: skip
    proc = torchrun(2, REPO / "tests" / "training" / "dist_worker.py", [str(run_dir), *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = [json.loads((run_dir / f"params_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0] == digests[1]
    logged = [r for r in records(run_dir) if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in logged] == [0, 1, 1, 1, 1]


@pytest.mark.distributed
def test_stop_on_one_rank_stops_both_naming_it(data_cache, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(data_cache, "+callbacks.nonfinite.at_step=1", "+callbacks.nonfinite.rank=1")
    proc = torchrun(2, REPO / "tests" / "training" / "dist_worker.py", [str(run_dir), *args])
    assert proc.returncode != 0
    assert "non-finite training loss at step 2: rank 1 micro-batch 0 (loss nan)" in proc.stderr
