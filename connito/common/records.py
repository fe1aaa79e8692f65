"""Versioned JSON records: the schema check every ``connito.<kind>/<version>`` reader shares.

Each record kind has one class beside its writer, in the layer that owns the record (``connito.analysis/1``:
:class:`connito.analysis.record.AnalysisRecord`; ``connito.mask/1``: :class:`connito.experts.mask_file.MaskFile`;
``connito.pipeline/1``: :class:`connito.orchestration.plan.Plan`; ``connito.job/1``:
:class:`connito.orchestration.jobs.JobState`). Their ``load`` reads the file through :func:`read_json_record`, which
refuses, with the file, the schema found, the schema expected and the fix:

* a file that is absent, not UTF-8, not JSON or not a JSON object;
* a record of another kind (``connito.mask/1`` given where an analysis belongs);
* a record of the same kind and a newer version (written by a newer Connito: upgrade), or an older one.

:class:`JsonRecord` is the base of the record classes whose fields are the file's top-level keys (the composition
provenance records, the retirement records): ``load``/``save``/``to_dict`` once, the file's layout kept byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from connito.common.atomic import atomic_write_text
from connito.common.errors import UserError

SCHEMA_PATTERN = re.compile(r"connito\.([A-Za-z0-9_.]+)/([0-9]+)")


class RecordError(UserError, ValueError):
    """A file that is not a readable record of the expected kind and version; the message names the fix."""


def schema_of(kind: str, version: int) -> str:
    """``connito.<kind>/<version>``."""
    return f"connito.{kind}/{version}"


def check_schema(
    found: object, path: str | Path, expected: str, *, what: str, fix: str, error: type[Exception] = RecordError
) -> None:
    """Raise ``error`` unless ``found`` (a record's ``schema`` value) is ``expected``; ``what`` names the record
    ("mask file"), ``fix`` says how to get a right one."""
    if found == expected:
        return
    ours = SCHEMA_PATTERN.fullmatch(expected)
    theirs = SCHEMA_PATTERN.fullmatch(found) if isinstance(found, str) else None
    if ours is None:
        raise ValueError(f"{expected!r} is not a connito.<kind>/<version> schema")
    if theirs is not None and theirs[1] == ours[1]:
        if int(theirs[2]) > int(ours[2]):
            raise error(
                f"{path} is a {what} of schema {found!r}, newer than this Connito reads ({expected!r}): upgrade "
                f"Connito, or {fix}"
            )
        raise error(f"{path} is a {what} of the older schema {found!r}; this Connito reads {expected!r}: {fix}")
    raise error(f"{path} is not a {what}: schema {found!r}, expected {expected!r}; {fix}")


def read_json_record(
    path: str | Path, expected: str, *, what: str, fix: str, error: type[Exception] = RecordError, key: str = "schema"
) -> dict:
    """The JSON object at ``path``, checked to carry ``schema == expected`` (:func:`check_schema`); ``key``: the
    key that holds the schema (``format`` in the export sidecars' manifests)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at {path}: {fix}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err}); {fix}") from None
    check_schema(record.get(key) if isinstance(record, dict) else None, path, expected, what=what, fix=fix,
                 error=error)  # fmt: skip
    return record


@dataclass(frozen=True)
class JsonRecord:
    """Base of a record class whose dataclass fields are the file's keys after ``schema``, in the file's order.

    A subclass sets :attr:`SCHEMA`, :attr:`WHAT` (what the error calls it), :attr:`FIX` (how to get a right one),
    :attr:`INDENT` and :attr:`END` (the file's layout, kept byte for byte), :attr:`SCHEMA_KEY` (the key holding
    the schema, first in the file; ``format`` in the export sidecars); fields named in :attr:`OMIT_IF_NONE`
    are left out of the file while None (keys only some records of the kind carry). :meth:`load` checks the
    schema and version (:func:`read_json_record`) and that every required key is there; :meth:`save` writes
    atomically."""

    SCHEMA: ClassVar[str]
    WHAT: ClassVar[str]
    FIX: ClassVar[str]
    INDENT: ClassVar[int | None] = 2
    END: ClassVar[str] = "\n"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()
    SCHEMA_KEY: ClassVar[str] = "schema"

    @classmethod
    def _keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        """The file's JSON object: ``schema``, then the fields in order."""
        record: dict[str, Any] = {self.SCHEMA_KEY: self.SCHEMA}
        for key in self._keys():
            value = getattr(self, key)
            if not (value is None and key in self.OMIT_IF_NONE):
                record[key] = value
        return record

    def dumps(self) -> str:
        """The file's text."""
        return json.dumps(self.to_dict(), indent=self.INDENT) + self.END

    @classmethod
    def from_dict(cls, record: Mapping, path: str | Path | None = None) -> Self:
        """The record of a parsed JSON object (its schema already checked); ``path`` names it in an error."""
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [key for key in required if key not in record]
        if missing:
            raise RecordError(f"{path or f'the {cls.WHAT}'} lacks {missing}: {cls.FIX}")
        return cls(**{key: record[key] for key in cls._keys() if key in record})

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """The record at ``path``, schema and version checked."""
        path = Path(path).expanduser()
        record = read_json_record(path, cls.SCHEMA, what=cls.WHAT, fix=cls.FIX, key=cls.SCHEMA_KEY)
        return cls.from_dict(record, path)

    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` atomically (a reader never sees half a file); returns ``path``."""
        return atomic_write_text(Path(path).expanduser(), self.dumps())
