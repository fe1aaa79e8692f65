"""Session fixtures shared by every test folder."""

import logging
from pathlib import Path

import pytest

from tests.infra import pytest_configure  # noqa: F401  (under CI=true, a run that skipped every test fails)


@pytest.fixture(autouse=True)
def root_logging_restored():
    """A command run in-process (``connito.cli.main.main``) lets Hydra configure logging: its ``job_logging``
    puts on the root logger a StreamHandler bound to the sys.stdout of that moment, the test's capture stream,
    which pytest closes after the test. Left there, every later log record fails to write ("--- Logging error ---"
    and a traceback on stderr) and breaks the tests that read stderr. Remove the handlers the test added (pytest's
    own capture handlers excepted, which pytest removes itself) and put back the root level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the whole session (downloads and tokenizer built once)."""
    return tmp_path_factory.mktemp("connito-cache")


@pytest.fixture(scope="session")
def one_node(data_cache, tmp_path_factory):
    """``one_node(ep_size)``: the overrides of a 4-step run and the run directory of what one node with two ranks
    trains with them (launch/torchrun_single_node.sh), run once per ep_size for the whole session: the torchrun and
    deepspeed multi-node tests and the lost-rank test all compare against this one uninterrupted run."""
    from tests.launch.test_multinode import one_node_reference

    runs: dict[int, tuple[list[str], Path]] = {}

    def reference(ep_size: int) -> tuple[list[str], Path]:
        if ep_size not in runs:
            runs[ep_size] = one_node_reference(data_cache, tmp_path_factory.mktemp(f"one-node-ep{ep_size}"), ep_size)
        return runs[ep_size]

    return reference
