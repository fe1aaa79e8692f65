"""Versioned JSON records: the schema check every ``connito.<kind>/<version>`` reader shares.

Each record kind has one class beside its writer, in the layer that owns the record (``connito.analysis/1``:
:class:`connito.analysis.record.AnalysisRecord`; ``connito.mask/1``: :class:`connito.experts.mask_file.MaskFile`;
``connito.pipeline/1``: :class:`connito.orchestration.plan.Plan`; ``connito.job/1``:
:class:`connito.orchestration.jobs.JobState`). Their ``load`` reads the file through :func:`read_json_record`, which
refuses, with the file, the schema found, the schema expected and the fix:

* a file that is absent, not UTF-8, not JSON or not a JSON object;
* a record of another kind (``connito.mask/1`` given where an analysis belongs);
* a record of the same kind and a newer version (written by a newer Connito: upgrade), or an older one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from connito.common.errors import UserError

SCHEMA_PATTERN = re.compile(r"connito\.([A-Za-z0-9_]+)/([0-9]+)")


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
    path: str | Path, expected: str, *, what: str, fix: str, error: type[Exception] = RecordError
) -> dict:
    """The JSON object at ``path``, checked to carry ``schema == expected`` (:func:`check_schema`)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at {path}: {fix}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err}); {fix}") from None
    check_schema(record.get("schema") if isinstance(record, dict) else None, path, expected, what=what, fix=fix,
                 error=error)  # fmt: skip
    return record
