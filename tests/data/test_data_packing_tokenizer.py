"""Tokenizer round trip and domain labels that survive packing, checked token by token."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from connito.data import DataConfig, prepare_data, unigram_cross_entropy
from connito.data.corpus import SPLITS
from connito.data.tokenizer import EOS, PAD

NON_ASCII = ["Größe, Maß und Übermut — naïve café ɑ", "日本語のテキスト 🙂 emoji\ttabs\r\n", "  leading spaces\n\n\n"]


def test_tokenizer_round_trip_every_domain(recipe_data):
    tok = AutoTokenizer.from_pretrained(str(recipe_data.tokenizer_dir))
    assert tok.eos_token == EOS and tok.bos_token == EOS and tok.pad_token == PAD
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) == 1024
    corpus = datasets.load_from_disk(str(recipe_data.corpus_dir))
    samples = list(NON_ASCII)
    for split in SPLITS:
        texts, domains = corpus[split]["text"], corpus[split]["domain"]
        for domain in recipe_data.domains:
            samples.append(next(t for t, d in zip(texts, domains) if d == domain))
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert len(tok.encode("hello world")) < len("hello world")  # merges were learned


def _segments(row_ids, row_domains, eos):
    """Split a token stream at eos into (token ids, set of domain labels incl. the eos)."""
    segments, ids, labels = [], [], set()
    for token, label in zip(row_ids, row_domains):
        labels.add(label)
        if token == eos:
            segments.append((ids, labels))
            ids, labels = [], set()
        else:
            ids.append(token)
    return segments


def test_labels_survive_packing_recipe(recipe_data):
    """Every complete document in the packed stream decodes to a corpus document of its labelled domain."""
    tok = recipe_data.load_tokenizer()
    corpus = datasets.load_from_disk(str(recipe_data.corpus_dir))
    for split in SPLITS:
        packed = recipe_data.load_split(split)[:]
        assert packed["input_ids"].shape[1] == recipe_data.seq_len
        domain_of = dict(zip(corpus[split]["text"], corpus[split]["domain"]))
        stream = packed["input_ids"].flatten().tolist()
        labels = packed["domain_ids"].flatten().tolist()
        segments = _segments(stream, labels, tok.eos_token_id)
        assert segments
        seen = set()
        for ids, seg_labels in segments:  # the stream starts at a document boundary; the tail is dropped
            text = tok.decode(ids)
            assert text in domain_of, split
            assert seg_labels == {recipe_data.domains.index(domain_of[text])}
            seen.add(domain_of[text])
        if split == "train":
            assert seen == set(recipe_data.domains)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@pytest.fixture(scope="module")
def disjoint_data(tmp_path_factory):
    """Two domains with disjoint alphabets: digits and lower-case letters (+ spaces in both)."""
    tmp = tmp_path_factory.mktemp("disjoint")
    rows = []
    for i in range(40):
        rows.append({"text": " ".join(str(i * 7919 + j) for j in range(30 + i)), "domain": "digits"})
        rows.append(
            {"text": " ".join("abcdefghij"[(i + j) % 10] * (1 + j % 5) for j in range(30 + i)), "domain": "letters"}
        )
    write_jsonl(tmp / "mixed.jsonl", rows)
    cfg = DataConfig(
        cache_dir=str(tmp / "cache"),
        source="files",
        files=[str(tmp / "mixed.jsonl")],
        vocab_size=300,
        seq_len=32,
        validation_fraction=0.1,
        test_fraction=0.1,
    )
    return prepare_data(cfg, progress=False)


def test_each_token_carries_its_documents_domain(disjoint_data):
    tok = disjoint_data.load_tokenizer()
    assert disjoint_data.domains == ("digits", "letters")
    alphabet = {0: set("0123456789 "), 1: set("abcdefghij ")}
    for split in SPLITS:
        rows = disjoint_data.load_split(split)[:]
        ids = rows["input_ids"].flatten().tolist()
        doms = rows["domain_ids"].flatten().tolist()
        assert set(doms) == {0, 1}
        for token, label in zip(ids, doms):
            if token == tok.eos_token_id:
                continue
            piece = tok.decode([token])
            assert piece and set(piece) <= alphabet[label], (piece, label)


def test_packed_rows_are_shuffled_across_domains(disjoint_data):
    rows = disjoint_data.load_split("train")[:]["domain_ids"]
    mixed = sum(len(set(row.tolist())) > 1 for row in rows)
    switches = (rows.flatten()[1:] != rows.flatten()[:-1]).sum().item()
    assert mixed >= 1 and switches > 10  # not one block per domain


def test_unigram_baseline(recipe_data):
    vocab = len(recipe_data.load_tokenizer())
    train = unigram_cross_entropy(recipe_data, "train")
    val = unigram_cross_entropy(recipe_data, "validation")
    assert set(val) == {*recipe_data.domains, "all"}
    for value in [*train.values(), *val.values()]:
        assert math.isfinite(value) and value > 0
    assert train["all"] < math.log(vocab) - 0.5
    # independent recomputation: add-one smoothed unigram of the train tokens, scored on validation
    train_ids = recipe_data.load_split("train")[:]["input_ids"].flatten()
    counts = torch.bincount(train_ids, minlength=vocab).double()
    logp = (counts + 1).log() - math.log(counts.sum().item() + vocab)
    val_rows = recipe_data.load_split("validation")[:]
    nll = -logp[val_rows["input_ids"].flatten()]
    assert val["all"] == pytest.approx(nll.mean().item(), rel=1e-9)
    prose = recipe_data.domains.index("prose")
    assert val["prose"] == pytest.approx(nll[val_rows["domain_ids"].flatten() == prose].mean().item(), rel=1e-9)
