"""The pipeline machinery on jobs that take no time: a fake job module whose behaviour a control file sets, so a
rerun can behave differently under the same plan (a fixed bug, a healed node)."""

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from connito.orchestration import Job, LauncherConfig, OrchestrationError, Plan, Stage, run_pipeline
from connito.orchestration.jobs import JobState, current_status, read_state, write_state
from connito.orchestration.launchers import sbatch_script, submit_slurm
from connito.orchestration.overrides import changed_overrides, override_value
from connito.orchestration.plan import first_difference

FAKE_JOB = """
import sys, time
from pathlib import Path
out, control = Path(sys.argv[1]), Path(sys.argv[2])
mode = control.read_text().strip() if control.exists() else "ok"
if mode == "fail":
    print("failing on purpose"); sys.exit(3)
if mode == "hang":
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".started").write_text("1"); time.sleep(600)
if mode != "silent":
    deps = sys.argv[3:]
    missing = [d for d in deps if not Path(d).exists()]
    if missing:
        print("missing input", missing); sys.exit(4)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("done " + " ".join(Path(d).read_text() for d in deps))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    package = tmp_path / "modules"
    package.mkdir()
    (package / "fakejob.py").write_text(FAKE_JOB)
    monkeypatch.setenv("PYTHONPATH", f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return tmp_path


def job(root: Path, name: str, deps=(), workdir=True) -> Job:
    out = root / name / "out.txt"
    command = (str(out), str(root / f"{name}.mode"), *(str(root / d / "out.txt") for d in deps))
    return Job(name, command, (str(out),), module="fakejob", workdir=str(root / name) if workdir else "")


def two_stage(root: Path) -> Plan:
    return Plan(
        "test",
        (Stage("branches", (job(root, "a"), job(root, "b"))), Stage("merge", (job(root, "merge", ("a", "b")),))),
        {"x": 1},
    )


def mode(root: Path, name: str, value: str) -> None:
    (root / f"{name}.mode").write_text(value)


def attempts(root: Path, plan: Plan) -> dict[str, int]:
    return {j.name: read_state(root, j.name).attempt for j in plan.jobs()}


def test_a_pipeline_runs_its_stages_in_order_and_a_rerun_runs_nothing(fake):
    root = fake / "run"
    plan = two_stage(root)
    run_pipeline(root, plan, LauncherConfig(max_parallel=2))
    assert (root / "merge" / "out.txt").read_text() == "done done  done "
    assert {j.name: current_status(root, j)[0] for j in plan.jobs()} == {"a": "done", "b": "done", "merge": "done"}
    run_pipeline(root, plan, LauncherConfig())
    assert attempts(root, plan) == {"a": 1, "b": 1, "merge": 1}
    assert json.loads((root / "pipeline.json").read_text())["schema"] == "connito.pipeline/1"


def test_a_failed_job_stops_the_pipeline_and_a_rerun_runs_only_it(fake):
    root = fake / "run"
    root.mkdir()
    plan = two_stage(root)
    mode(root, "b", "fail")
    with pytest.raises(OrchestrationError) as err:
        run_pipeline(root, plan, LauncherConfig(max_parallel=2))
    message = str(err.value)
    assert "b: failed: exit code 3" in message and "nothing was merged" in message
    assert current_status(root, plan.job("a"))[0] == "done"
    assert current_status(root, plan.job("merge"))[0] == "pending" and not (root / "merge").exists()
    assert "failing on purpose" in (root / "logs" / "b.log").read_text()
    mode(root, "b", "ok")
    run_pipeline(root, plan, LauncherConfig())
    assert attempts(root, plan) == {"a": 1, "b": 2, "merge": 1}
    assert read_state(root, "b").history == [] and read_state(root, "b").status == "done"


def test_a_killed_job_is_lost_and_rerun_alone(fake):
    root = fake / "run"
    root.mkdir()
    plan = two_stage(root)
    mode(root, "a", "hang")

    def kill_a_once_started():
        started = root / "a" / "out.txt.started"
        for _ in range(600):
            if started.exists() and read_state(root, "a").pid:
                break
            time.sleep(0.05)
        os.killpg(os.getpgid(read_state(root, "a").pid), signal.SIGKILL)

    killer = threading.Thread(target=kill_a_once_started)
    killer.start()
    with pytest.raises(OrchestrationError, match=r"a: lost: pid \d+ on .* is gone without a result"):
        run_pipeline(root, plan, LauncherConfig(max_parallel=2))
    killer.join()
    assert current_status(root, plan.job("b"))[0] == "done"
    mode(root, "a", "ok")
    run_pipeline(root, plan, LauncherConfig())
    assert attempts(root, plan) == {"a": 2, "b": 1, "merge": 1}


def test_exit_zero_without_the_output_is_a_failure(fake):
    root = fake / "run"
    root.mkdir()
    plan = two_stage(root)
    mode(root, "a", "silent")
    with pytest.raises(OrchestrationError, match=r"a: failed: exited 0 but did not write .*a/out.txt"):
        run_pipeline(root, plan, LauncherConfig())


def test_a_deleted_output_makes_the_job_and_everything_after_it_run_again(fake):
    root = fake / "run"
    plan = two_stage(root)
    run_pipeline(root, plan, LauncherConfig())
    (root / "a" / "out.txt").unlink()
    assert current_status(root, plan.job("a"))[0] == "failed"
    run_pipeline(root, plan, LauncherConfig())
    assert attempts(root, plan) == {"a": 2, "b": 1, "merge": 2}


def test_other_settings_are_refused_and_rerun_all_starts_over(fake):
    root = fake / "run"
    plan = two_stage(root)
    run_pipeline(root, plan, LauncherConfig())
    other = Plan(plan.kind, plan.stages, {"x": 2})
    with pytest.raises(OrchestrationError, match=r"other settings \(settings.x: 1 before, 2 now\).*rerun=all"):
        run_pipeline(root, other, LauncherConfig())
    (root / "a" / "stale").write_text("from the old plan")
    run_pipeline(root, other, LauncherConfig(), rerun="all")
    assert not (root / "a" / "stale").exists()
    assert attempts(root, plan) == {"a": 2, "b": 2, "merge": 2}


def test_a_running_job_is_not_started_twice(fake):
    root = fake / "run"
    plan = two_stage(root)
    write_state(root, JobState("a", status="running", host=os.uname().nodename, pid=os.getpid()))
    with pytest.raises(OrchestrationError, match=r"\['a'\] .* still running or queued"):
        run_pipeline(root, plan, LauncherConfig())


def test_bad_launcher_settings_are_refused(fake):
    root = fake / "run"
    with pytest.raises(ValueError, match="launcher.kind='pbs'"):
        run_pipeline(root, two_stage(root), LauncherConfig(kind="pbs"))
    with pytest.raises(ValueError, match="use launcher.kind=torchrun for nproc_per_node>1"):
        run_pipeline(root, two_stage(root), LauncherConfig(nproc_per_node=2))
    with pytest.raises(ValueError, match="rerun='failed'"):
        run_pipeline(root, two_stage(root), LauncherConfig(), rerun="failed")
    with pytest.raises(OrchestrationError, match=r"unique .* \['a'\]"):
        Plan("test", (Stage("s", (job(root, "a"), job(root, "a"))),))


def test_slurm_stages_are_arrays_chained_by_afterok(fake, monkeypatch):
    """With a stand-in sbatch (no SLURM needed): the script, the dependency flags and the queued states."""
    root = fake / "run"
    bin_dir = fake / "bin"
    bin_dir.mkdir()
    calls = fake / "sbatch_calls"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nwc -l < {calls} | tr -d " " | sed "s/^/10/"\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    squeue = bin_dir / "squeue"  # every job queued (a real squeue whose controller is down waits for it: ~50 s)
    squeue.write_text("#!/bin/sh\necho PENDING\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    plan = two_stage(root)
    run_pipeline(root, plan, LauncherConfig(kind="slurm", wait=False), run_name="demo")
    lines = calls.read_text().splitlines()
    assert lines[0] == f"--parsable {root}/slurm/branches.sbatch"
    assert lines[1] == f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {root}/slurm/merge.sbatch"
    script = (root / "slurm" / "branches.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "JOBS=(a b)" in script and "--job-name=connito-demo-branches" in script
    assert [read_state(root, n).slurm_job for n in ("a", "b", "merge")] == ["101_0", "101_1", "102_0"]
    assert {read_state(root, n).status for n in ("a", "b", "merge")} == {"queued"}


def test_the_sbatch_script_carries_the_resources_asked_for(tmp_path):
    cfg = LauncherConfig(kind="slurm", nproc_per_node=8)
    cfg.slurm.partition, cfg.slurm.time, cfg.slurm.gpus_per_task, cfg.slurm.mem = "gpu", "04:00:00", 8, "200G"
    cfg.slurm.sbatch_args = ["--account=lab"]
    jobs = [Job("x", ("train",), ranks=8)]
    script = sbatch_script(tmp_path, "branches", jobs, cfg, "exp")
    for line in ("--partition=gpu", "--time=04:00:00", "--gpus=8", "--mem=200G", "--account=lab",
                 "--cpus-per-task=8", "--array=0-0"):  # fmt: skip
        assert f"#SBATCH {line}" in script


def test_sbatch_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OrchestrationError, match="needs sbatch on PATH"):
        submit_slurm(tmp_path, "s", [Job("x", ("train",))], LauncherConfig(kind="slurm"), "exp", None)


def test_overrides_keep_every_character():
    assert override_value("~/a b/it's") == "'~/a b/it\\'s'"
    assert override_value(["code", "docs"]) == "['code','docs']"
    assert override_value(None) == "null" and override_value(True) == "true" and override_value(0.5) == "0.5"
    from connito.data.config import DataConfig

    assert changed_overrides("data", DataConfig()) == []
    assert changed_overrides("data", DataConfig(seq_len=128), domains=["code"]) == [
        "data.domains=['code']",
        "data.seq_len=128",
    ]
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 2}}) == "a.b: 1 before, 2 now"


@pytest.mark.slurm
def test_the_sbatch_template_runs_a_planned_stage_by_hand(fake, slurm_cluster):
    """launch/slurm/pipeline_stage.sbatch, submitted by hand to a real SLURM: each array task runs its job."""
    import subprocess
    import sys

    from connito.orchestration.plan import write_plan
    from tests.helpers import REPO

    root = fake / "run"
    plan = two_stage(root)
    write_plan(root, plan)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{REPO}"
    out = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--array=0-1", "--cpus-per-task=1", f"--output={fake}/slurm-%A_%a.out",
         str(REPO / "launch" / "slurm" / "pipeline_stage.sbatch"), str(root), "a", "b"],
        capture_output=True, text=True, env=env, cwd=fake, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + "".join(p.read_text() for p in fake.glob("slurm-*.out"))
    assert [current_status(root, plan.job(n))[0] for n in ("a", "b", "merge")] == ["done", "done", "pending"]
    assert read_state(root, "a").slurm_job.endswith("_0") and read_state(root, "b").slurm_job.endswith("_1")


def test_changed_stage_settings_rerun_that_stage_and_keep_the_ones_before(fake):
    root = fake / "run"
    plan = two_stage(root)
    run_pipeline(root, plan, LauncherConfig())
    merge_stage = Stage("merge", plan.stages[1].jobs, {"threshold": 0.5})
    relaxed = Plan(plan.kind, (plan.stages[0], merge_stage), plan.settings)
    (root / "merge" / "stale").write_text("from the old merge")
    run_pipeline(root, relaxed, LauncherConfig())
    assert attempts(root, plan) == {"a": 1, "b": 1, "merge": 2}
    assert not (root / "merge" / "stale").exists()
    assert relaxed.all_settings() == {"x": 1, "threshold": 0.5}
    run_pipeline(root, relaxed, LauncherConfig())  # the same again: nothing runs
    assert attempts(root, plan) == {"a": 1, "b": 1, "merge": 2}
