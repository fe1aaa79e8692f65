"""Session fixtures shared by every test folder."""

from pathlib import Path

import pytest

from tests.infra import pytest_configure  # noqa: F401  (under CI=true, a run that skipped every test fails)


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
