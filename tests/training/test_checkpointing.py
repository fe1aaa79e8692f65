"""The latest pointer never names a broken checkpoint, whatever moment a save dies."""

from pathlib import Path

import pytest

from connito.training import checkpointing
from connito.training.checkpointing import TrainState


class FakeEngine:
    """Writes a shard file like DeepSpeed does; can die half-way. No optimizer (as under an inference engine)."""

    optimizer = None

    def __init__(self, die: bool = False):
        self.die = die

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False
        target = Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        (target / "mp_rank_00_model_states.pt").write_bytes(b"partial" if self.die else b"weights")
        if self.die:
            raise KeyboardInterrupt("killed while writing")


def test_a_save_killed_midway_leaves_latest_on_the_previous_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    checkpointing.save(FakeEngine(), root, TrainState(step=4, tokens_seen=10), is_main=True, keep=2)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save(FakeEngine(die=True), root, TrainState(step=8), is_main=True, keep=2)

    assert (root / "latest").read_text() == "step_000004"
    assert (root / "step_000008").is_dir() and not checkpointing.is_complete(root / "step_000008")
    assert checkpointing.find_latest(root) == root / "step_000004"


def test_latest_naming_an_incomplete_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    root = tmp_path / "checkpoints"
    checkpointing.save(FakeEngine(), root, TrainState(step=4), is_main=True, keep=0)
    (root / "step_000008").mkdir()
    (root / "latest").write_text("step_000008")  # e.g. written by hand or by an older tool
    assert checkpointing.find_latest(root) == root / "step_000004"


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpointing.save(FakeEngine(), root, TrainState(step=step), is_main=True, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003"]


def test_loading_an_incomplete_checkpoint_names_the_fix(tmp_path):
    (tmp_path / "step_000001").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete Connito checkpoint"):
        checkpointing.load(FakeEngine(), tmp_path / "step_000001")
