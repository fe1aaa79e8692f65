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

from tests.helpers import REPO, assert_same_final_state, clean_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def curve(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records if "train/loss" in r]


def test_a_killed_rank_is_restarted_and_ends_on_the_uninterrupted_parameters(one_node, tmp_path):
    # The uninterrupted run: the session's one-node run of 4 steps on 2 ranks (tests/conftest.py), which never
    # checkpointed mid-way; this run checkpoints at step 3, loses a rank there and resumes for step 4.
    common, straight_dir = one_node(1)
    args = [*common, f"run.root={tmp_path / 'runs'}", "train.checkpoint_every=3",
            "plugins=[tests.training.hold_ranks_callback]", "+callbacks.hold_ranks.at_step=3"]  # fmt: skip
    bindir = str(Path(sys.executable).parent)
    env = clean_env(
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO), NPROC="2", MAX_RESTARTS="1"
    )
    script = str(REPO / "launch" / "torchrun_single_node.sh")
    killed_dir = tmp_path / "runs" / "killed"

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
    assert_same_final_state(straight_dir, killed_dir)  # both ranks' weights and optimizer state
