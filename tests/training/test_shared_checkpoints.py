"""A checkpoint directory that is not shared between nodes (each rank sees its own run.root) is refused at the
start, with the fix, instead of training on and resuming ranks from different checkpoints."""

import shutil

import pytest

from tests.helpers import REPO, small_overrides, torchrun

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "training" / "split_dir_worker.py"


def overrides(data_cache) -> list[str]:
    return small_overrides(data_cache) + [
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.export=false",
    ]


@pytest.mark.slow
def test_ranks_that_see_different_run_directories_are_refused(data_cache, tmp_path):
    proc = torchrun(2, WORKER, [str(tmp_path / "node0"), str(tmp_path / "node1"), *overrides(data_cache)])
    assert proc.returncode != 0
    assert "the ranks do not see the same checkpoint directory" in proc.stderr, proc.stderr[-4000:]
    assert "rank 1: does not see rank 0's probe file" in proc.stderr
    assert "put run.root on a filesystem every node shares" in proc.stderr
    assert not (tmp_path / "node0" / "metrics.jsonl").exists()  # refused before any training


@pytest.mark.slow
def test_a_resume_where_one_rank_sees_another_latest_is_refused(data_cache, tmp_path):
    shared = tmp_path / "shared"
    first = torchrun(2, WORKER, [str(shared), str(shared), *overrides(data_cache), "train.stop_after=2"])
    assert first.returncode == 0, first.stderr[-4000:]
    stale = tmp_path / "stale"  # a node whose local copy is an older state of the run: no checkpoint yet
    shutil.copytree(shared, stale, ignore=shutil.ignore_patterns("checkpoints"))
    proc = torchrun(2, WORKER, [str(shared), str(stale), *overrides(data_cache)])
    assert proc.returncode != 0
    rank0 = "rank 0: sees rank 0's probe file, latest=step_000002, resume from step_000002"
    assert rank0 in proc.stderr, proc.stderr[-4000:]
    assert "rank 1: does not see rank 0's probe file, latest=none, resume from none" in proc.stderr
