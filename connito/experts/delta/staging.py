"""Write a directory all at once: into a temporary sibling, renamed into place only when complete; a checkpoint's
tokenizer files copied along.

A failure (a bad tensor, a full disk, Ctrl-C) leaves no half-written checkpoint or delta behind, and nothing is
ever written into the inputs: an output directory equal to, inside, or holding an input is refused up front.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from connito.models.families import ModelError

TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template*",
)
"""A checkpoint's tokenizer files (what ``tokenizer.save_pretrained`` writes)."""


def copy_tokenizer_files(source: Path, stage: Path) -> None:
    """Copy ``source``'s tokenizer files into ``stage`` (a checkpoint being written), keeping any already there."""
    for pattern in TOKENIZER_FILES:
        for file in Path(source).glob(pattern):
            if file.is_file() and not (stage / file.name).exists():
                shutil.copy2(file, stage / file.name)


def _nested(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_out_dir(out_dir: str | Path, overwrite: bool, inputs: Mapping[str, str | Path]) -> Path:
    """``out_dir`` resolved, or :class:`ModelError` when writing there could touch an input (``inputs`` maps what
    each is, e.g. ``"the base checkpoint"``, to its path) or replace an existing directory without ``overwrite``."""
    out = Path(out_dir).expanduser().resolve()
    for what, path in inputs.items():
        path = Path(path).expanduser().resolve()
        if _nested(out, path):
            where = "is" if out == path else "is inside" if out.is_relative_to(path) else "holds"
            raise ModelError(
                f"out='{out}' {where} {what} ('{path}'): Connito never writes into its inputs. Choose an output "
                "directory outside it"
            )
    if out.exists() and not out.is_dir():
        raise ModelError(f"out='{out}' exists and is not a directory. Choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(
            f"out='{out}' exists and is not empty. Choose a new directory, or pass overwrite=true to replace it"
        )
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on a clean exit it replaces ``out`` (whose old contents
    are deleted only once the new directory is in place), on an error it is deleted and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        try:
            stage.rename(out)
        except BaseException:
            if old is not None:
                (old / out.name).rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
