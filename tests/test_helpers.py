"""The bit-for-bit comparison of two runs' final state (tests/helpers.py) catches what it must: one flipped bit,
-0.0 for 0.0, a missing name, a changed counter; and it reads every file of a checkpoint."""

import json

import pytest
import torch

from tests.helpers import assert_same_bits, assert_same_final_state, checkpoint_contents


def test_identical_contents_pass_and_count_the_tensors():
    a = {"w": torch.arange(6.0).reshape(2, 3), "nan": torch.tensor([float("nan")]), "steps": 3}
    assert assert_same_bits(a, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()}, "x") == 2


@pytest.mark.parametrize(
    ("b", "message"),
    [
        ({"w": torch.tensor([1.0, 2.0 + 2**-22, 3.0]), "n": 1}, r"x: 1 of 2 entries differ; the first is w: 1 of 3 "
                                                                 r"elements differ, max \|a - b\| = 2.38e-07, first at "
                                                                 r"index \(1,\): 2.0 vs 2.000000238418579"),
        ({"w": torch.tensor([1.0, 2.0, 3.0]), "n": 2}, "the first is n: 1 vs 2"),
        ({"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), "n": 1}, r"w: \(3,\) torch.float32 vs \(3,\) "),
        ({"w": torch.tensor([1.0, 2.0]), "n": 1}, r"w: \(3,\) torch.float32 vs \(2,\) torch.float32"),
        ({"v": torch.tensor([1.0, 2.0, 3.0]), "n": 1}, r"names differ; only in the first: \['w'\] \(1\), only in "),
    ],
    ids=["one-bit", "counter", "dtype", "shape", "name"],
)  # fmt: skip
def test_a_difference_is_named(b, message):
    with pytest.raises(AssertionError, match=message):
        assert_same_bits({"w": torch.tensor([1.0, 2.0, 3.0]), "n": 1}, b, "x")


def test_negative_zero_is_not_zero():
    with pytest.raises(AssertionError, match=r"z: 1 of 1 elements differ, max \|a - b\| = 0"):
        assert_same_bits({"z": torch.tensor([0.0])}, {"z": torch.tensor([-0.0])}, "x")


def write_run(run, module_w, exp_avg, step=2):
    checkpoint = run / "checkpoints" / f"step_{step:06d}"
    checkpoint.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(checkpoint.name)
    state = {"module": {"w": module_w}, "optimizer": {"state": {0: {"exp_avg": exp_avg, "step": torch.tensor(2.0)}}}}
    torch.save(state, checkpoint / "mp_rank_00_model_states.pt")
    torch.save({"probe": {"steps": step}}, checkpoint / "callback_state.pt")
    (checkpoint / "connito_state.json").write_text(json.dumps({"step": step, "tokens_seen": 64}))


def test_every_file_of_the_final_checkpoint_is_compared(tmp_path):
    write_run(tmp_path / "a", torch.ones(3), torch.zeros(3))
    write_run(tmp_path / "b", torch.ones(3), torch.tensor([0.0, 1e-30, 0.0]))
    assert sorted(checkpoint_contents(tmp_path / "a" / "checkpoints" / "step_000002")) == [
        "callback_state.pt:probe.steps",
        "connito_state.json:step",
        "connito_state.json:tokens_seen",
        "mp_rank_00_model_states.pt:module.w",
        "mp_rank_00_model_states.pt:optimizer.state.0.exp_avg",
        "mp_rank_00_model_states.pt:optimizer.state.0.step",
    ]
    assert_same_final_state(tmp_path / "a", tmp_path / "a")
    with pytest.raises(AssertionError, match=r"the first is mp_rank_00_model_states.pt:optimizer.state.0.exp_avg: 1 "):
        assert_same_final_state(tmp_path / "a", tmp_path / "b")
