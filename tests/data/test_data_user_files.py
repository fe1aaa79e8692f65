"""User files (jsonl, txt, parquet) and every bad input's DataError message."""

from __future__ import annotations

import json

import datasets
import pytest

from connito.data import DataConfig, DataError, prepare_data
from connito.data.user_files import read_files

SPLITS = ("train", "validation", "test")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def rows(domain, n, column="text"):
    return [
        {column: f"{domain} document number {i}: " + "words and more words " * (i % 5 + 1), "domain": domain}
        for i in range(n)
    ]


def cfg_for(tmp_path, files, **kw):
    return DataConfig(
        cache_dir=str(tmp_path / "cache"),
        source="files",
        files=[str(f) for f in files],
        vocab_size=300,
        seq_len=16,
        **kw,
    )


def corpus_of(prepared):
    return datasets.load_from_disk(str(prepared.corpus_dir))


def test_jsonl_with_domain_column(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", rows("law", 12) + rows("med", 9) + [{"text": "  ", "domain": "law"}])
    prepared = prepare_data(cfg_for(tmp_path, [f]), progress=False)
    assert prepared.domains == ("law", "med")
    corpus = corpus_of(prepared)
    assert sum(len(corpus[s]) for s in SPLITS) == 21  # the blank document is dropped
    for split in SPLITS:
        assert set(corpus[split]["domain"]) == {"law", "med"}


def test_text_files_one_domain_per_file(tmp_path):
    for name in ("alpha", "beta"):
        paragraphs = [f"{name} paragraph {i}\nsecond line" + " and more" * i for i in range(6)]
        (tmp_path / f"{name}.txt").write_text("\n\n".join(paragraphs))
    prepared = prepare_data(cfg_for(tmp_path, [tmp_path / "*.txt"]), progress=False)
    assert prepared.domains == ("alpha", "beta")
    corpus = corpus_of(prepared)
    texts = [t for split in SPLITS for t in corpus[split]["text"]]
    assert len(texts) == 12
    assert "alpha paragraph 1\nsecond line and more" in [t.strip() for t in texts]  # paragraph = document


def test_parquet_one_domain_per_file_and_custom_text_column(tmp_path):
    for name in ("news", "chat"):
        datasets.Dataset.from_list(rows(name, 5, column="body")).to_parquet(str(tmp_path / f"{name}.parquet"))
    prepared = prepare_data(
        cfg_for(tmp_path, [tmp_path / "*.parquet"], domain_column=None, text_column="body"), progress=False
    )
    assert prepared.domains == ("chat", "news")
    assert len(prepared.load_split("train")) > 0


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(
        DataError,
        match=r"data.files entry '.*/nothing/\*.jsonl' matches no file \(relative paths "
        r"resolve against .*\); fix the path or remove the entry",
    ):
        read_files(cfg_for(tmp_path, [tmp_path / "nothing" / "*.jsonl"]), tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data.files entry '.*missing.jsonl' matches no file"):
        prepare_data(cfg_for(tmp_path, [tmp_path / "missing.jsonl"]), progress=False)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"file '.*empty.jsonl' is empty; fill it or remove it from data.files"):
        read_files(cfg_for(tmp_path, [tmp_path / "empty.jsonl"]), tmp_path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(
        DataError,
        match=r"file '.*data.csv' has an unsupported type '.csv'; use one of "
        r"\['.json', '.jsonl', '.parquet', '.txt'\]",
    ):
        read_files(cfg_for(tmp_path, [tmp_path / "data.csv"]), tmp_path)


def test_unknown_text_column(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", rows("law", 4, column="body"))
    with pytest.raises(
        DataError,
        match=r"text column 'text' not found in '.*d.jsonl'; columns found: "
        r"\['body', 'domain'\]. Set data.text_column to one of them$",
    ):
        read_files(cfg_for(tmp_path, [f]), tmp_path)


def test_unknown_domain_column(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", rows("law", 4))
    with pytest.raises(
        DataError,
        match=r"domain column 'topic' not found in '.*d.jsonl'; columns found: "
        r"\['text', 'domain'\]. Set data.domain_column to one of them, or to null for one "
        r"domain per file",
    ):
        read_files(cfg_for(tmp_path, [f], domain_column="topic"), tmp_path)


def test_empty_domain(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl", rows("law", 4) + [{"text": "", "domain": "med"}, {"text": " \n", "domain": "med"}]
    )
    with pytest.raises(
        DataError,
        match=r"domain 'med' has no non-empty documents in data.files; add text to it "
        r"or remove its rows",
    ):
        read_files(cfg_for(tmp_path, [f]), tmp_path)


def test_domain_with_too_few_documents(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", rows("law", 6) + rows("med", 2))
    with pytest.raises(
        DataError,
        match=r"domain 'med' has 2 non-empty document\(s\); splitting by document needs "
        r"at least 3 \(data.min_docs_per_split=1 each for train, validation and test\)",
    ):
        prepare_data(cfg_for(tmp_path, [f]), progress=False)
    with pytest.raises(
        DataError,
        match=r"domain 'law' has 6 non-empty document\(s\); splitting by document needs "
        r"at least 9 \(data.min_docs_per_split=3",
    ):
        prepare_data(
            cfg_for(tmp_path, [write_jsonl(tmp_path / "e.jsonl", rows("law", 6))], min_docs_per_split=3), progress=False
        )


def test_split_too_small_for_one_row(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab", "domain": "x"}] * 3)
    with pytest.raises(DataError, match=r"split 'train' has \d+ tokens, fewer than one row of data.seq_len=16"):
        prepare_data(cfg_for(tmp_path, [f]), progress=False)


def test_unknown_source(tmp_path):
    with pytest.raises(DataError, match=r"unknown data.source 'web'; use 'recipe', 'files' or 'hub'"):
        prepare_data(DataConfig(cache_dir=str(tmp_path), source="web"), progress=False)


def test_hub_without_name(tmp_path):
    with pytest.raises(DataError, match=r"data.source is 'hub' but data.hub_name is empty"):
        prepare_data(DataConfig(cache_dir=str(tmp_path), source="hub"), progress=False)
