"""Layer 0: plain-Python helpers every layer may use: files written atomically (:mod:`.atomic`), the schema check of
versioned JSON records (:mod:`.records`), the base class of errors a user can fix (:mod:`.errors`).

Why a layer of its own: the writers of records and checkpoints sit in every layer, the lowest included (``data/``
writes its summary, ``experts/`` mask files and delta packages, ``training/`` checkpoints, the methods their
records). Put in ``models/`` (the lowest existing package), a file helper would make ``data/`` and ``experts/``
depend on the model families for a temp-file-and-rename; copied into each layer, it drifted (nine copies, some
without fsync, some leaving a 0700 directory or a raw ``Permission denied`` naming a temp file). Nothing here imports
torch, transformers or any other ``connito`` package, so every layer can use it without an upward import.
"""

from connito.common.atomic import (
    UnwritableError,
    atomic_open,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from connito.common.records import RecordError, read_json_record, schema_of

__all__ = [
    "RecordError",
    "UnwritableError",
    "atomic_open",
    "atomic_replace_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_json_record",
    "schema_of",
]
