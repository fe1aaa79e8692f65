"""The document corpus: ``DatasetDict`` of train/validation/test split by document, per domain.

Columns: ``text`` (str), ``domain`` (str), ``doc_id`` (str, ``"<domain>/<index>"``, unique; the index
is the document's position in its domain's source order). Each domain is split on its own, so every
domain is present in every split, and a document lives in exactly one split.
"""

from __future__ import annotations

import random

import datasets

from connito.data.config import DataConfig
from connito.data.errors import DataError

SPLITS = ("train", "validation", "test")


def split_sizes(n_docs: int, cfg: DataConfig, domain: str) -> tuple[int, int, int]:
    """Documents of one domain per split: fractions rounded, each at least ``min_docs_per_split``."""
    floor = max(1, cfg.min_docs_per_split)
    needed = 3 * floor
    if n_docs < needed:
        raise DataError(
            f"domain '{domain}' has {n_docs} non-empty document(s); splitting by document needs at least "
            f"{needed} (data.min_docs_per_split={cfg.min_docs_per_split} each for train, validation and "
            f"test). Add documents to '{domain}', raise data.max_chars_per_domain, or lower data.min_docs_per_split"
        )
    n_val = max(floor, round(cfg.validation_fraction * n_docs))
    n_test = max(floor, round(cfg.test_fraction * n_docs))
    n_train = n_docs - n_val - n_test
    if n_train < floor:
        raise DataError(
            f"domain '{domain}' has {n_docs} documents, too few to keep {floor} for train after "
            f"validation ({n_val}) and test ({n_test}); lower data.validation_fraction/test_fraction"
        )
    return n_train, n_val, n_test


def build_corpus(docs: dict[str, list[str]], cfg: DataConfig) -> datasets.DatasetDict:
    """Split every domain's documents by document, deterministically from ``cfg.seed``."""
    for name, value in (("validation_fraction", cfg.validation_fraction), ("test_fraction", cfg.test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"data.{name}={value} must lie in [0, 1)")
    columns = {split: {"text": [], "domain": [], "doc_id": []} for split in SPLITS}
    for domain in sorted(docs):
        texts = docs[domain]
        sizes = split_sizes(len(texts), cfg, domain)
        order = list(range(len(texts)))
        random.Random(f"{cfg.seed}/{domain}").shuffle(order)
        start = 0
        for split, size in zip(SPLITS, sizes):
            for i in sorted(order[start : start + size]):
                columns[split]["text"].append(texts[i])
                columns[split]["domain"].append(domain)
                columns[split]["doc_id"].append(f"{domain}/{i:05d}")
            start += size
    features = datasets.Features({k: datasets.Value("string") for k in ("text", "domain", "doc_id")})
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(cols, features=features) for split, cols in columns.items()}
    )
