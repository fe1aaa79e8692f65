"""Session fixtures shared by every test folder."""

from pathlib import Path

import pytest

from tests.infra import pytest_configure  # noqa: F401  (under CI=true, a run that skipped every test fails)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the whole session (downloads and tokenizer built once)."""
    return tmp_path_factory.mktemp("connito-cache")
