"""prepare_data caching: a second call reuses, a config change rebuilds, a killed run resumes."""

from __future__ import annotations

import dataclasses
import os
import shutil

from connito.data import prepare, prepare_data
from connito.data.prepare import config_key

BUILDERS = ("_read_documents", "build_corpus", "train_tokenizer", "copy_tokenizer", "pack_split", "_summary")
"""What connito.data.prepare calls to (re)build a cache directory; a cache hit calls none of them."""


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_second_call_reuses_the_cache(recipe_cfg, recipe_data, monkeypatch):
    before = _mtimes(recipe_data.root)
    for name in BUILDERS:
        assert hasattr(prepare, name), name  # a renamed builder would make this test vacuous

        def rebuild(*args, name=name, **kwargs):
            raise AssertionError(f"a cache hit called {name}")

        monkeypatch.setattr(prepare, name, rebuild)
    again = prepare_data(recipe_cfg, progress=False)
    assert again == recipe_data
    assert _mtimes(recipe_data.root) == before
    assert (recipe_data.root / "DONE").is_file()


def test_config_change_gives_another_dir(recipe_cfg, recipe_data):
    for change in ({"seed": 4}, {"seq_len": 64}, {"vocab_size": 2048}, {"domains": ["code", "docs"]}):
        assert config_key(dataclasses.replace(recipe_cfg, **change)) != config_key(recipe_cfg), change
    # where the cache lives does not change what is in it
    assert config_key(dataclasses.replace(recipe_cfg, cache_dir="/elsewhere")) == config_key(recipe_cfg)
    other = prepare_data(dataclasses.replace(recipe_cfg, seq_len=64, domains=["docs", "code"]), progress=False)
    assert other.root != recipe_data.root and other.root.parent == recipe_data.root.parent
    assert other.domains == ("code", "docs")
    assert other.load_split("train")[0]["input_ids"].shape == (64,)


def test_killed_run_is_resumed_not_trusted(recipe_cfg, tmp_path):
    cfg = dataclasses.replace(
        recipe_cfg, cache_dir=str(tmp_path), domains=["docs"], seq_len=32, max_chars_per_domain=60_000
    )
    first = prepare_data(cfg, progress=False)
    corpus_mtime = (first.corpus_dir / "dataset_dict.json").stat().st_mtime_ns
    tokens_before = first.load_split("train")[:]["input_ids"]
    # simulate a kill during packing: no DONE, packed half-written in a temp dir
    os.remove(first.root / "DONE")
    shutil.rmtree(first.packed_dir)
    (first.root / "packed.tmp-99999" / "train").mkdir(parents=True)
    again = prepare_data(cfg, progress=False)
    assert (again.root / "DONE").is_file()
    assert (again.corpus_dir / "dataset_dict.json").stat().st_mtime_ns == corpus_mtime  # corpus reused
    assert again.load_split("train")[:]["input_ids"].equal(tokens_before)  # same result, rebuilt
