"""Write a directory all at once: into a temporary sibling, renamed into place only when complete; a checkpoint's
tokenizer files copied along.

A failure (a bad tensor, a full disk, Ctrl-C) leaves no half-written checkpoint or delta behind, and nothing is
ever written into the inputs: an output directory equal to, inside, or holding an input is refused up front.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from connito.common.atomic import atomic_replace_dir
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


staged_dir = atomic_replace_dir
"""The directory swap every checkpoint writer uses (:func:`connito.common.atomic_replace_dir`)."""
