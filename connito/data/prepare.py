"""Public entry point: ``prepare_data(cfg)`` builds (once) corpus, tokenizer and packed rows in the cache.

Cache layout, ``<cache>/data-<hash>/`` where the hash covers every config field that changes the result::

    corpus/      DatasetDict train/validation/test: text, domain, doc_id
    tokenizer/   transformers tokenizer directory (AutoTokenizer.from_pretrained)
    packed/      train/, validation/, test/: input_ids, domain_ids (int32/int16 x seq_len on disk)
    summary.json domains, docs/chars/tokens per split and domain, sources and licenses
    DONE         written last; a directory without it is resumed, never trusted

Each artefact is built in a ``*.tmp-<pid>`` directory and ``os.replace``d into place, so a killed run
leaves either a whole artefact or none. Downloads are shared by all configs in ``<cache>/downloads``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np

from connito.common.atomic import atomic_write_json
from connito.data import recipe, user_files
from connito.data.config import DataConfig
from connito.data.corpus import SPLITS, build_corpus
from connito.data.errors import DataError
from connito.data.packing import pack_split
from connito.data.tokenizer import copy_tokenizer, train_tokenizer

log = logging.getLogger("connito.data")

FORMAT_VERSION = 1  # bump when a change in this package changes prepared artefacts


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Handles to one prepared, complete cache directory."""

    root: Path
    corpus_dir: Path
    tokenizer_dir: Path
    packed_dir: Path
    domains: tuple[str, ...]  # sorted; index = domain id in ``domain_ids``
    seq_len: int

    def load_split(self, split: str) -> datasets.Dataset:
        """Packed rows of ``split`` with ``with_format("torch")``: each row (or batch) gives
        ``input_ids`` and ``domain_ids`` as int64 tensors of shape [seq_len] (or [B, seq_len])."""
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; use one of {list(SPLITS)}")
        return datasets.load_from_disk(str(self.packed_dir / split)).with_format("torch")

    def load_tokenizer(self):
        """The trained tokenizer through ``AutoTokenizer`` (a ``PreTrainedTokenizerFast``)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def summary(self) -> dict:
        """Contents of ``summary.json``."""
        return json.loads((self.root / "summary.json").read_text())


def config_key(cfg: DataConfig) -> str:
    """Short hash of every field that affects the prepared data (not ``cache_dir``).

    For user files the resolved paths, sizes and modification times count too, so an edited file rebuilds.
    """
    fields = dataclasses.asdict(cfg)
    fields.pop("cache_dir")
    fields["format_version"] = FORMAT_VERSION
    if cfg.source == "files":
        fields["files"] = [
            (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in user_files.resolve_files(cfg.files)
        ]
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _publish(tmp: Path, dst: Path) -> None:
    """Move a finished artefact into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, dst)
    except OSError:
        if not dst.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp(path: Path) -> Path:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _read_documents(cfg: DataConfig, cache: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Documents per domain and, per domain, where they came from and under which license."""
    if cfg.source == "recipe":
        docs = recipe.read_recipe(list(cfg.domains), cache / "downloads", cfg.max_chars_per_domain)
        sources = {d: {"source": recipe.RECIPE[d].source, "license": recipe.RECIPE[d].license} for d in docs}
    elif cfg.source == "files":
        docs = user_files.read_files(cfg, cache / "hf")
        sources = {d: {"source": "data.files", "license": "user data"} for d in docs}
    elif cfg.source == "hub":
        docs = user_files.read_hub(cfg, cache / "hf")
        sources = {d: {"source": f"hub:{cfg.hub_name}", "license": "see the dataset card"} for d in docs}
    else:
        raise DataError(f"unknown data.source '{cfg.source}'; use 'recipe', 'files' or 'hub'")
    return docs, sources


def _flat(ds: datasets.Dataset, column: str) -> np.ndarray:
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in ds.data.column(column).chunks]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _summary(cfg, key, corpus, packed, domains, sources) -> dict:
    splits = {}
    for split in SPLITS:
        per_domain = {d: {"docs": 0, "chars": 0, "tokens": 0} for d in domains}
        for text, domain in zip(corpus[split]["text"], corpus[split]["domain"]):
            per_domain[domain]["docs"] += 1
            per_domain[domain]["chars"] += len(text)
        counts = np.bincount(_flat(packed[split], "domain_ids"), minlength=len(domains))
        for i, d in enumerate(domains):
            per_domain[d]["tokens"] = int(counts[i])
        splits[split] = {"rows": len(packed[split]), "domains": per_domain}
    return {
        "key": key,
        "config": dataclasses.asdict(cfg),
        "domains": list(domains),
        "seq_len": cfg.seq_len,
        "splits": splits,
        "sources": sources,
    }


def prepare_data(cfg: DataConfig, *, progress: bool = True) -> PreparedData:
    """Build (or reuse) corpus, tokenizer and packed rows for ``cfg``; idempotent and kill-safe.

    ``progress`` logs one INFO line per stage on logger ``connito.data`` (DEBUG when False).
    Raises ``DataError`` for any bad or unobtainable input, before anything is trained.
    """
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one log line per stage instead
    try:
        return _prepare(cfg, logging.INFO if progress else logging.DEBUG)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _prepare(cfg: DataConfig, level: int) -> PreparedData:
    cache = cfg.resolved_cache_dir()
    key = config_key(cfg)
    root = cache / f"data-{key}"
    corpus_dir, tok_dir, packed_dir = root / "corpus", root / "tokenizer", root / "packed"
    if (root / "DONE").exists():
        domains = tuple(json.loads((root / "summary.json").read_text())["domains"])
        log.log(level, "data: reusing %s (domains %s)", root, ", ".join(domains))
        return PreparedData(root, corpus_dir, tok_dir, packed_dir, domains, cfg.seq_len)
    root.mkdir(parents=True, exist_ok=True)
    start = t0 = time.perf_counter()

    docs, sources = _read_documents(cfg, cache)
    domains = tuple(sorted(docs))
    if not corpus_dir.exists():
        corpus = build_corpus(docs, cfg)
        tmp = _tmp(corpus_dir)
        corpus.save_to_disk(str(tmp))
        _publish(tmp, corpus_dir)
    corpus = datasets.load_from_disk(str(corpus_dir))
    counts = {s: {d: corpus[s]["domain"].count(d) for d in domains} for s in SPLITS}
    log.log(
        level,
        "data: corpus of %d domains, documents per split %s (%.1fs)",
        len(domains),
        counts,
        time.perf_counter() - t0,
    )

    t0 = time.perf_counter()
    if not tok_dir.exists():
        tmp = _tmp(tok_dir)
        if cfg.tokenizer_path:
            copy_tokenizer(cfg.tokenizer_path, tmp)
        else:
            train_tokenizer(corpus["train"], cfg.vocab_size, tmp)
        _publish(tmp, tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    kind = f"tokenizer from {cfg.tokenizer_path}" if cfg.tokenizer_path else "byte-level BPE tokenizer"
    log.log(level, "data: %s, %d tokens (%.1fs)", kind, len(tokenizer), time.perf_counter() - t0)

    t0 = time.perf_counter()
    if not packed_dir.exists():
        tmp = _tmp(packed_dir)
        for split in SPLITS:
            packed, tokens = pack_split(corpus[split], tokenizer, domains, cfg.seq_len, cfg.seed, split)
            packed.save_to_disk(str(tmp / split))
            log.log(
                level,
                "data: packed %s: %d tokens %s -> %d rows of %d",
                split,
                sum(tokens.values()),
                tokens,
                len(packed),
                cfg.seq_len,
            )
        _publish(tmp, packed_dir)
    packed = {s: datasets.load_from_disk(str(packed_dir / s)) for s in SPLITS}
    log.log(level, "data: packing done (%.1fs)", time.perf_counter() - t0)

    summary = _summary(cfg, key, corpus, packed, domains, sources)
    atomic_write_json(root / "summary.json", summary, indent=2)
    (root / "DONE").write_text(f"{time.time()}\n")
    log.log(level, "data: ready in %s (%.1fs)", root, time.perf_counter() - start)
    return PreparedData(root, corpus_dir, tok_dir, packed_dir, domains, cfg.seq_len)


def unigram_cross_entropy(prepared: PreparedData, split: str = "validation") -> dict[str, float]:
    """Cross-entropy in nats/token of an add-one smoothed unigram model fitted on the train split's
    packed tokens, evaluated on ``split``'s packed tokens: per domain and ``"all"``.

    The floor a language model must beat; the trainer prints it beside its loss.
    """
    vocab = len(prepared.load_tokenizer())
    train = datasets.load_from_disk(str(prepared.packed_dir / "train"))
    counts_V = np.bincount(_flat(train, "input_ids"), minlength=vocab).astype(np.float64)
    logp_V = np.log(counts_V + 1.0) - math.log(counts_V.sum() + vocab)
    ds = train if split == "train" else datasets.load_from_disk(str(prepared.packed_dir / split))
    ids_N, dom_N = _flat(ds, "input_ids"), _flat(ds, "domain_ids")
    nll_N = -logp_V[ids_N]
    out = {d: float(nll_N[dom_N == i].mean()) for i, d in enumerate(prepared.domains) if (dom_N == i).any()}
    out["all"] = float(nll_N.mean())
    return out
