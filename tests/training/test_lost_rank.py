"""Surviving a lost rank: under `torchrun --max_restarts 1` (launch/torchrun_single_node.sh, MAX_RESTARTS=1) one
rank is killed with SIGKILL right after a checkpoint; torchrun restarts the group, the run resumes from the latest
complete checkpoint (train.resume=auto) and finishes with the very parameters and optimizer state of an
uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_same_final_state, clean_env, small_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def curve(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records if "train/loss" in r]


def test_a_killed_rank_is_restarted_and_ends_on_the_uninterrupted_parameters(data_cache, tmp_path):
    args = small_overrides(data_cache) + [
        "train.steps=8",
        "train.checkpoint_every=3",
        "train.eval_every=0",
        f"run.root={tmp_path / 'runs'}",
        "plugins=[tests.training.hold_ranks_callback]",
        "+callbacks.hold_ranks.at_step=3",
    ]
    bindir = str(Path(sys.executable).parent)
    env = clean_env(
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO), NPROC="2", MAX_RESTARTS="1"
    )
    script = str(REPO / "launch" / "torchrun_single_node.sh")

    straight_dir, killed_dir = tmp_path / "runs" / "straight", tmp_path / "runs" / "killed"
    straight_dir.mkdir(parents=True)
    (straight_dir / "release").write_text("")  # no hold on the uninterrupted run
    straight = subprocess.run(
        [script, "run.name=straight", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-4000:]

    launcher = subprocess.Popen(
        [script, "run.name=killed", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    held = [killed_dir / f"held_rank{r}" for r in (0, 1)]
    deadline = time.monotonic() + 240
    while not all(p.is_file() and p.read_text() for p in held) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the run never reached its step-3 checkpoint"
        time.sleep(0.1)
    assert launcher.poll() is None, launcher.stdout.read()[-4000:]
    assert (killed_dir / "checkpoints" / "latest").read_text() == "step_000003"
    os.kill(int(held[1].read_text()), signal.SIGKILL)  # rank 1 dies; rank 0 is still held at the barrier
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-4000:]
    assert "resumed from" in output and "step_000003" in output, output[-4000:]

    assert curve(killed_dir) == curve(straight_dir)
    assert_same_final_state(straight_dir, killed_dir)  # both ranks' weights and optimizer state, and the export
