"""launch/slurm.sbatch through a real SLURM (launch/slurm/local_cluster.sh up): the template's own command line
(`scontrol show hostnames` for the head node, srun, torchrun) trains, and as time slices (`--requeue` with a `--time`
limit) the job stops itself before the limit, requeues itself until the run is finished, and ends with the
parameters and optimizer state of an uninterrupted run, bit for bit."""

import re
import subprocess
import time

import pytest

from tests.helpers import REPO, assert_same_final_state, free_port, small_overrides
from tests.launch.test_multinode import script_env
from tests.orchestration.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.distributed]


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job: str, timeout: float) -> dict[str, str]:
    """The job's final state. A requeued job waits for its begin time (SLURM holds it ~2 minutes); once it has waited
    5 s (the last slice's processes are gone by then) the test moves the begin time to now."""
    deadline, pending_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since > 5:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30, check=False)
                pending_since = None
        else:
            pending_since = None
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30, check=False)
    raise AssertionError(f"job {job} did not end within {timeout:.0f}s: {job_state(job)}")


def test_time_slices_requeue_until_the_run_is_finished(tmp_path, data_cache, slurm_cluster):  # noqa: F811
    args = small_overrides(data_cache) + [
        "train.steps=3",
        "train.eval_every=0",
        "analysis=none",
        f"run.root={tmp_path / 'runs'}",
    ]
    straight = subprocess.run(
        [str(REPO / "launch" / "torchrun_single_node.sh"), "run.name=straight", *args],
        cwd=tmp_path, env=script_env(NPROC="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-4000:]

    # --time 10 minutes: each slice gets train.stop_after_time=29Xs from the time left (STOP_MARGIN 300 s), far
    # more than this tiny run needs; train.stop_after=1 makes the slices short instead, one step each, so the
    # 3 steps take 3 slices whatever the machine's speed.
    submit = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "--time=10", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
         str(REPO / "launch" / "slurm.sbatch"), "run.name=sliced", *args, "train.stop_after=1"],
        cwd=tmp_path, env=script_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    state = wait_for(job, timeout=600)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-5000:]
    assert state["Restarts"] == "2", log[-5000:]
    assert re.search(r"slice 1: 9:5\d left, the run stops after 29\ds", log), log[-5000:]
    assert "stopped at step 1 of 3 (train.stop_after): requeueing job" in log, log[-5000:]
    assert "stopped at step 2 of 3 (train.stop_after): requeueing job" in log, log[-5000:]
    assert not list(tmp_path.glob(".connito-status-*")), "the status file is removed when the job ends"

    assert_same_final_state(tmp_path / "runs" / "straight", tmp_path / "runs" / "sliced")  # checkpoint and export


def test_a_time_limit_shorter_than_the_margin_is_refused(tmp_path, slurm_cluster):  # noqa: F811
    submit = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--requeue", "--time=1", f"--output={tmp_path}/slurm-%j.out",
         str(REPO / "launch" / "slurm.sbatch"), "train.steps=1"],
        cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    job = submit.stdout.strip().split(";")[0]
    assert submit.returncode != 0
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "left, not more than STOP_MARGIN=300s: give it a longer --time" in log, log
