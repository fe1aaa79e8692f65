"""Time slices (train.stop_after_time): a run stops with a checkpoint before its wall-time budget runs out, says so in
<run>/status.json, and the same command resumes it; slice by slice it ends where a straight run ends: the same
weights and optimizer state, bit for bit."""

import json

import pytest
import torch

from connito.training.time_slice import TimeSlice, parse_duration
from connito.training.trainer import run_training
from tests.helpers import assert_same_final_state, compose_train, small_overrides


@pytest.mark.parametrize(
    "text, seconds",
    [("", 0), ("0", 0), ("90", 90), ("90s", 90), ("45m", 2700), ("3h50m", 13800), ("1d2h", 93600), ("1.5h", 5400),
     (" 2H 30M ", 9000)],
)  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3x", "h", "-5", "5m3", "1:30:00", "3h-50m"])
def test_a_bad_duration_names_the_format(text):
    with pytest.raises(ValueError, match=r"is not a duration: write seconds \(5400\) or numbers with units"):
        parse_duration(text)


def test_the_slice_stops_when_the_next_step_would_not_fit(monkeypatch):
    import connito.training.time_slice as time_slice

    clock = TimeSlice(10.0, started_at=0.0)
    clock.loop_started_at = 2.0  # 2 s of setup, then steps of 3 s
    times = iter([5.0, 8.0])
    monkeypatch.setattr(time_slice.time, "monotonic", lambda: next(times))
    assert clock.over(1, torch.device("cpu")) is False  # t=5: 5 + 3 <= 10
    assert clock.over(1, torch.device("cpu")) is True  # t=8: 8 + 3 > 10


def test_a_bad_stop_after_time_is_refused_before_any_work(tmp_path):
    cfg = compose_train(small_overrides(tmp_path / "cache") + ["train.stop_after_time=ten minutes"])
    with pytest.raises(ValueError, match="train.stop_after_time='ten minutes' is not a duration"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_time_slices_resume_to_the_straight_run(data_cache, tmp_path):
    torch.set_num_threads(1)
    common = small_overrides(data_cache) + ["train.steps=4", "train.eval_every=0", "train.export=false"]
    run_training(compose_train(common), tmp_path / "straight")
    assert json.loads((tmp_path / "straight" / "status.json").read_text()) == {
        "finished": True,
        "step": 4,
        "steps": 4,
        "started_step": 0,
        "stopped_by": None,
        "checkpoint": str(tmp_path / "straight" / "checkpoints" / "step_000004"),
    }

    # A budget of a millisecond: every invocation does one step (at least one always runs), then stops.
    slices = []
    for _ in range(4):
        result = run_training(compose_train(common + ["train.stop_after_time=0.001s"]), tmp_path / "sliced")
        slices.append(json.loads((tmp_path / "sliced" / "status.json").read_text()))
    assert [(s["started_step"], s["step"], s["finished"]) for s in slices] == [
        (0, 1, False),
        (1, 2, False),
        (2, 3, False),
        (3, 4, True),
    ]
    assert slices[0]["stopped_by"] == "train.stop_after_time"
    assert slices[0]["checkpoint"] == str(tmp_path / "sliced" / "checkpoints" / "step_000001")
    assert result.finished
    assert_same_final_state(tmp_path / "straight", tmp_path / "sliced")  # weights and AdamW state, bit for bit
