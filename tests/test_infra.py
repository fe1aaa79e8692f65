"""tests/infra.py: missing CI infrastructure fails under CI=true and skips elsewhere; a CI session that skipped
every test fails."""

import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.infra import in_ci, require

MISSING = "no frobnicator on PATH: apt-get install frobnicator"
TINY_TESTS = """
from tests.infra import require

def test_needs_a_frobnicator():
    require("no frobnicator on PATH: apt-get install frobnicator")

def test_needs_nothing():
    require(None)
"""


def test_present_infrastructure_neither_skips_nor_fails(monkeypatch):
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        assert require(None) is None


def test_missing_infrastructure_skips_outside_ci(monkeypatch):
    for ci in ("", "false", "1"):
        monkeypatch.setenv("CI", ci)
        assert not in_ci()
        with pytest.raises(pytest.skip.Exception, match=f"^{MISSING}$"):
            require(MISSING)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=f"^{MISSING}$"):
        require(MISSING)


def test_missing_infrastructure_fails_under_ci_with_the_skip_message(monkeypatch):
    for ci in ("true", "TRUE", "True"):
        monkeypatch.setenv("CI", ci)
        assert in_ci()
        with pytest.raises(pytest.fail.Exception, match=rf"^{MISSING} \[CI=true: CI provides this"):
            require(MISSING)


def run_pytest(tmp_path, ci: str, *select: str) -> subprocess.CompletedProcess:
    """pytest with tests/infra.py as its only plugin on a two-test file, under CI=``ci``."""
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.infra", "-p", "no:cacheprovider", "-rs", "-q", *select],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_ci_session_that_skipped_every_test_fails(tmp_path):
    # Outside CI a missing tool is a skip, and a session of skips passes.
    out = run_pytest(tmp_path, "", "-k", "frobnicator")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and MISSING in out.stdout

    # Under CI the same test fails by itself ...
    out = run_pytest(tmp_path, "true", "-k", "frobnicator")
    assert out.returncode == 1 and "1 failed" in out.stdout and MISSING in out.stdout, out.stdout + out.stderr

    # ... and a selection whose every test skipped (here the only one, with pytest.skip) fails the session.
    (tmp_path / "test_gpu.py").write_text("import pytest\n\ndef test_cuda():\n    pytest.skip('needs a CUDA device')\n")
    out = run_pytest(tmp_path, "true", "test_gpu.py")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 skipped" in out.stdout and "CI=true: all 1 selected tests were skipped and none ran" in out.stdout
    assert run_pytest(tmp_path, "", "test_gpu.py").returncode == 0

    # One test that ran is enough: a skipped GPU test beside it does not fail the session.
    out = run_pytest(tmp_path, "true", "-k", "cuda or nothing")
    assert out.returncode == 0 and "1 passed, 1 skipped" in out.stdout, out.stdout + out.stderr
