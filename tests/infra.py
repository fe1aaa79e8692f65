"""What a test needs from the machine and CI provides: missing, it fails the test under ``CI=true`` and skips it
elsewhere.

.ci/run installs a SLURM cluster, the container tools (debootstrap, podman, buildah, as root), the ``connito``
console script and the Debian data packages before it runs pytest with ``CI=true``; a test that finds one of them
missing there found a broken CI, not a laptop without it, and must not turn green by skipping. Every such test
calls :func:`require` with why it cannot run (``None`` when it can).

A CUDA device is not CI infrastructure: CI has no GPU by design, so ``gpu`` tests (tests/kernels' "needs a CUDA
device") keep calling ``pytest.skip`` directly, under CI too.

:class:`RanNothingFails` (registered by tests/conftest.py) covers the other way a CI stage goes green without
testing anything: under ``CI=true``, a session that selected tests and skipped every one of them exits with
status 1 instead of 0.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """``CI=true`` (any case) is set, as .ci/run and most CI services set it."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require(missing: str | None) -> None:
    """Return when ``missing`` is None; otherwise ``missing`` (what is absent and how to get it) fails the test
    under ``CI=true`` and skips it elsewhere, with that message either way."""
    if missing is None:
        return
    if in_ci():
        pytest.fail(f"{missing} [CI=true: CI provides this, so it fails instead of skipping]", pytrace=False)
    pytest.skip(missing)


class RanNothingFails:
    """Under ``CI=true``: tests were selected but none ran (all skipped), so the session fails (exit status 1)."""

    def __init__(self) -> None:
        self.ran = 0
        self.message = ""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and not report.skipped:
            self.ran += 1

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        selected = len(getattr(session, "items", ()))
        if in_ci() and session.exitstatus == pytest.ExitCode.OK and selected and not self.ran:
            self.message = (
                f"CI=true: all {selected} selected tests were skipped and none ran; a CI stage that tests nothing fails"
            )
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.message:
            terminalreporter.write_line(self.message, red=True, bold=True)


def pytest_configure(config: pytest.Config) -> None:
    """Registers :class:`RanNothingFails`; tests/conftest.py re-exports this hook, ``-p tests.infra`` loads it."""
    if not config.pluginmanager.has_plugin("connito-ran-nothing-fails"):
        config.pluginmanager.register(RanNothingFails(), "connito-ran-nothing-fails")
