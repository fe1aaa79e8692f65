""".ci/run on stand-ins (apt-get, the SLURM script, python3, pip, pytest log their calls and fail on request):
it runs the README's test command verbatim under CI=true, always runs every slow stage, times each stage, and
ends non-zero at the first failed install, cluster start or test stage."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

README_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[test]" '
    '&& .venv/bin/pytest -m "not slow"'
)
STAGES = ("machine setup", "install + default tests", "slow: slurm", "slow: docker", "slow: the others")
# Each stand-in logs "<name> <args>" (pytest also its CI variable) and exits 3 when $FAIL_<NAME> is its first or
# second argument (or "any").
STUB = """#!/bin/sh
echo "{name} $* {extra}" >> "$CALLS"
fail="${{FAIL_{var}:-}}"
if [ -n "$fail" ] && {{ [ "$fail" = any ] || [ "$fail" = "$1" ] || [ "$fail" = "$2" ]; }}; then exit 3; fi
{body}
"""
VENV_BODY = 'if [ "$1" = -m ]; then mkdir -p .venv/bin; cp "$STUBS/pip" "$STUBS/pytest" .venv/bin/; fi'


def stub(path: Path, name: str, extra: str = "", body: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB.format(name=name, var=name.upper().replace("-", "_"), extra=extra, body=body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def ci_tree(tmp_path) -> Path:
    """A copy of .ci/run beside a stand-in launch/slurm/local_cluster.sh, with stand-ins for the tools it runs."""
    tree = tmp_path / "repo"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", tree / ".ci" / "run")
    stub(tree / "launch" / "slurm" / "local_cluster.sh", "cluster")
    stubs = tmp_path / "stubs"
    stub(stubs / "apt-get", "apt-get")
    stub(stubs / "id", "id", body="echo 0")
    stub(stubs / "python3", "python3", body=VENV_BODY)
    stub(stubs / "pip", "pip")
    stub(stubs / "pytest", "pytest", extra="CI=$CI")
    return tree


def run_ci(tree: Path, **fail: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    stubs, calls = tree.parent / "stubs", tree.parent / "calls"
    calls.write_text("")
    env = {"PATH": f"{stubs}{os.pathsep}/usr/bin:/bin", "CALLS": str(calls), "STUBS": str(stubs), "TMPDIR": str(tree)}
    env.update({f"FAIL_{name.upper()}": value for name, value in fail.items()})
    proc = subprocess.run(
        ["bash", str(tree / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60, cwd=tree.parent
    )
    lines = [line.split(" CI=")[0].strip() for line in calls.read_text().splitlines()]
    return proc, [line for line in lines if line != "id -u"]


def test_the_ci_script_is_valid_bash_and_runs_the_readme_command_verbatim():
    script = (REPO / ".ci" / "run").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")]).returncode == 0
    assert README_COMMAND in (REPO / "README.md").read_text()
    assert README_COMMAND in script.splitlines()


def test_every_stage_runs_under_ci_true_and_is_timed(ci_tree):
    proc, calls = run_ci(ci_tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == [
        "apt-get update -qq",
        "apt-get install -y -qq metamath-databases fortunes-de debootstrap podman buildah",
        "cluster up",
        "python3 -m venv .venv",
        "pip install -q torch==2.13.0",
        "pip install -q -e .[test]",
        "pytest -m not slow",
        "pytest -m slow and slurm",
        "pytest -m slow and docker",
        "pytest -m slow and not slurm and not docker",
        "cluster down",
    ]
    pytest_env = [
        line.split(" CI=")[1] for line in (ci_tree.parent / "calls").read_text().splitlines() if " CI=" in line
    ]
    assert pytest_env == ["true"] * 4
    for stage in STAGES:
        assert any(line.startswith(f"ci: == {stage}") and line.endswith("s") for line in proc.stdout.splitlines())


@pytest.mark.parametrize(
    "fail, last_call, message",
    [
        ({"apt_get": "install"}, "apt-get install", "ci: apt-get install failed"),
        (
            {"cluster": "up"},
            "cluster up",
            "ci: == machine setup (apt: Debian data, image tools; one-node SLURM): FAILED",
        ),
        ({"pip": "install"}, "pip install -q torch==2.13.0", "ci: exit 3"),
        ({"pytest": "slow and slurm"}, "pytest -m slow and slurm", "ci: == slow: slurm: FAILED (exit 3)"),
    ],
)
def test_the_first_failed_install_cluster_or_stage_ends_ci_non_zero(ci_tree, fail, last_call, message):
    proc, calls = run_ci(ci_tree, **fail)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert calls[-2].startswith(last_call) and calls[-1] == "cluster down"  # nothing after it ran; SLURM stopped
