"""What every connito.<kind>/<version> record class promises, checked the same way for each kind (imported by the
record tests of each layer): the file as the writer wrote it before the class comes back field for field and is
written again byte for byte; a record of another kind and one of a newer version are refused with the exact
message naming the file, the schemas and the fix."""

import json
from collections.abc import Callable

import pytest

from connito.common.records import RecordError


def check_record_kind(tmp_path, cls, record: dict, old_format: Callable[[dict], str], what: str, fix: str) -> None:
    """``record``: a record of ``cls`` as a dict (the schema under ``cls.SCHEMA_KEY``); ``old_format``: how the
    writer turned such a dict into the file's text before the class."""
    key = cls.SCHEMA_KEY
    path = tmp_path / "record.json"
    path.write_text(old_format(record))
    loaded = cls.load(path)
    assert loaded.to_dict() == record
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()

    other = "connito.probe/1"
    path.write_text(old_format({**record, key: other}))
    with pytest.raises(RecordError) as caught:
        cls.load(path)
    assert str(caught.value) == f"{path} is not a {what}: schema {other!r}, expected {cls.SCHEMA!r}; {fix}"

    future = cls.SCHEMA.rsplit("/", 1)[0] + "/2"
    path.write_text(old_format({**record, key: future}))
    with pytest.raises(RecordError) as caught:
        cls.load(path)
    assert str(caught.value) == (
        f"{path} is a {what} of schema {future!r}, newer than this Connito reads ({cls.SCHEMA!r}): upgrade "
        f"Connito, or {fix}"
    )


def indented(indent: int, end: str) -> Callable[[dict], str]:
    """``json.dumps(record, indent=indent) + end``: how most writers wrote their records."""
    return lambda record: json.dumps(record, indent=indent) + end
