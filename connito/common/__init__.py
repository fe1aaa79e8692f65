"""Layer 0: plain-Python helpers every layer may use (files written atomically, versioned JSON records).

Nothing here imports torch, transformers or any other ``connito`` package, so ``models/``, ``experts/``, ``data/``
and everything above can share it without an upward import.
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
