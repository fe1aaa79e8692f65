"""Session fixtures shared by every test folder."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the whole session (downloads and tokenizer built once)."""
    return tmp_path_factory.mktemp("connito-cache")
