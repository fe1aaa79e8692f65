"""A training process killed with SIGKILL resumes, by rerunning the same command, onto the exact loss curve of
an uninterrupted run and onto its final weights and optimizer state, bit for bit, with a test callback
(tests/training/probe_callback.py: a loss term, a gradient hook, state kept across steps) whose state the
checkpoints carry: its logged and saved state must match too."""

import json
import signal
import subprocess
import sys
import time

from tests.helpers import REPO, assert_same_final_state, clean_env, small_overrides


def curve(run_dir) -> list[dict]:
    """Every logged training record but its wall-clock speed."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records if "train/loss" in r]


def test_sigkill_then_rerun_reproduces_the_uninterrupted_loss_curve(data_cache, tmp_path):
    args = [
        "train",
        "train.steps=14",
        "train.checkpoint_every=3",
        "train.eval_every=0",
        "train.export=false",
        "plugins=[tests.training.probe_callback]",
        "+callbacks.probe.coef=0.05",
        *small_overrides(data_cache),
    ]
    command = [sys.executable, "-m", "connito", *args]
    env = clean_env(PYTHONPATH=str(REPO))  # the test callback's module is importable from the repository

    def run(name: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            command + [f"run.name={name}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("straight")

    victim = subprocess.Popen(
        command + ["run.name=killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = (tmp_path / "runs" / "killed" / "checkpoints" / "latest").read_text()
    assert latest in {"step_000003", "step_000006"}

    resumed = run("killed")
    assert "resumed from" in resumed.stdout + resumed.stderr
    resumed_curve, straight_curve = curve(tmp_path / "runs" / "killed"), curve(tmp_path / "runs" / "straight")
    assert resumed_curve == straight_curve
    assert [r["probe/steps"] for r in straight_curve] == list(range(1, 15))  # the callback's state came back
    assert_same_final_state(tmp_path / "runs" / "straight", tmp_path / "runs" / "killed")
