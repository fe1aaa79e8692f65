"""User data: local json/jsonl/parquet/txt files, or a hub dataset, read through ``datasets``.

Every problem with the input raises ``DataError`` before any training, naming the file, the column
or the domain at fault and the setting that fixes it.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import datasets

from connito.data.config import DataConfig
from connito.data.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand ``data.files`` (paths or globs, ``~`` allowed) to existing files, sorted, without duplicates."""
    if not patterns:
        raise DataError(
            "data.source is 'files' but data.files is empty; list .jsonl/.json/.parquet/.txt "
            "files or globs in data.files"
        )
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(
                f"data.files entry '{pattern}' matches no file (relative paths resolve against "
                f"{os.getcwd()}); fix the path or remove the entry"
            )
        for path in matches:
            if path.suffix not in BUILDERS:
                raise DataError(f"file '{path}' has an unsupported type '{path.suffix}'; use one of {sorted(BUILDERS)}")
            if path.stat().st_size == 0:
                raise DataError(f"file '{path}' is empty; fill it or remove it from data.files")
            if path.resolve() not in found:
                found.append(path.resolve())
    return found


def check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a text file (json, jsonl, txt) that is not UTF-8, naming the line and column of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(chunk_bytes):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        pass
    else:
        return
    with path.open("rb") as f:  # only when it is not UTF-8: find the line (no UTF-8 sequence holds a newline byte)
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = line[err.start : err.start + 1].hex()
                raise DataError(
                    f"'{path}' line {number} column {err.start + 1}: byte 0x{byte} is not UTF-8 text. Save the file "
                    f"as UTF-8 (e.g. iconv -f latin1 -t utf-8 '{path.name}' > fixed{path.suffix}), or remove it from "
                    "data.files"
                ) from None


def json_problem(path: Path) -> str | None:
    """Where ``path`` (one JSON document, or JSON Lines) is not valid JSON: ``line L column C (<reason>)``, or None."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as whole:
            if not text.lstrip().startswith("{"):  # one document (a list of rows): the position in it
                return f"line {whole.lineno} column {whole.colno} ({whole.msg})"
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} column {err.colno} ({err.msg})"
    return None


@contextlib.contextmanager
def _datasets_errors_quiet():
    """datasets logs a failed file at ERROR before raising; the DataError says it once, with the line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_one(path: Path, cache_dir: Path) -> datasets.Dataset:
    builder = BUILDERS[path.suffix]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    if builder in ("json", "text"):
        check_utf8(path)
    try:
        with _datasets_errors_quiet():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir), **kwargs)
    except Exception as err:  # datasets raises many types for unreadable files
        where = json_problem(path) if builder == "json" else None
        if where is not None:
            shape = (
                "one JSON object per line" if path.suffix == ".jsonl" else "one JSON document or one object per line"
            )
            raise DataError(
                f"'{path}' is not valid JSON at {where}. Fix it ({shape}), or remove the file from data.files"
            ) from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not read '{path}' as {builder}: {reason}. Fix or remove the file") from err
    if len(ds) == 0:
        raise DataError(f"file '{path}' has no rows; fill it or remove it from data.files")
    return ds


def _check_column(ds: datasets.Dataset, column: str, what: str, setting: str, where: str, hint: str = "") -> None:
    if column not in ds.column_names:
        raise DataError(
            f"{what} column '{column}' not found in {where}; columns found: {ds.column_names}. "
            f"Set {setting} to one of them{hint}"
        )


def _collect(
    ds: datasets.Dataset, cfg: DataConfig, where: str, file_domain: str | None, docs: dict[str, list[str]]
) -> None:
    """Append the documents of ``ds`` to ``docs`` by domain (``file_domain`` when given)."""
    if file_domain is None:
        _check_column(
            ds, cfg.domain_column, "domain", "data.domain_column", where, ", or to null for one domain per file"
        )
    _check_column(ds, cfg.text_column, "text", "data.text_column", where)
    texts = ds.data.column(cfg.text_column).to_pylist()
    labels = [file_domain] * len(texts) if file_domain is not None else ds.data.column(cfg.domain_column).to_pylist()
    for text, label in zip(texts, labels):
        if label is None or str(label) == "":
            raise DataError(
                f"{where} has a row with an empty domain in column '{cfg.domain_column}'; "
                "label every row or set data.domain_column to null for one domain per file"
            )
        docs[str(label)]  # register the domain even if this text is empty
        if isinstance(text, str) and text.strip():
            docs[str(label)].append(text)


def check_domains(docs: dict[str, list[str]], origin: str) -> None:
    """Every domain must hold at least one non-empty document."""
    if not docs:
        raise DataError(f"{origin} holds no documents; check data.files / data.hub_name")
    for name, texts in sorted(docs.items()):
        if not texts:
            raise DataError(
                f"domain '{name}' has no non-empty documents in {origin}; add text to it or remove its rows"
            )


def read_files(cfg: DataConfig, cache_dir: Path) -> dict[str, list[str]]:
    """Documents per domain from ``cfg.files``.

    With ``cfg.domain_column`` set, json/parquet rows carry their domain in that column; otherwise (and
    always for ``.txt``, whose documents are blank-line separated paragraphs) a file is one domain
    named by its stem.
    """
    docs: dict[str, list[str]] = defaultdict(list)
    for path in resolve_files(cfg.files):
        ds = _load_one(path, cache_dir)
        per_file = not cfg.domain_column or path.suffix == ".txt"
        text_ds = (
            ds.rename_column("text", cfg.text_column) if path.suffix == ".txt" and cfg.text_column != "text" else ds
        )
        _collect(text_ds, cfg, f"'{path}'", path.stem if per_file else None, docs)
    check_domains(docs, "data.files")
    return dict(docs)


def read_hub(cfg: DataConfig, cache_dir: Path) -> dict[str, list[str]]:
    """Documents per domain from ``load_dataset(cfg.hub_name, split=cfg.hub_split)`` (needs the hub)."""
    if not cfg.hub_name:
        raise DataError("data.source is 'hub' but data.hub_name is empty; set it to a dataset name")
    if not cfg.domain_column:
        raise DataError("a hub dataset needs data.domain_column (there is no file to name a domain after)")
    try:
        ds = datasets.load_dataset(cfg.hub_name, split=cfg.hub_split, cache_dir=str(cache_dir))
    except Exception as err:
        raise DataError(
            f"could not load hub dataset '{cfg.hub_name}' split '{cfg.hub_split}': {err}. "
            "Check the name and your connection (the connito command runs offline unless you export "
            "HF_HUB_OFFLINE=0), or use data.source=files"
        ) from err
    docs: dict[str, list[str]] = defaultdict(list)
    _collect(ds, cfg, f"hub dataset '{cfg.hub_name}'", None, docs)
    check_domains(docs, f"hub dataset '{cfg.hub_name}'")
    return dict(docs)
