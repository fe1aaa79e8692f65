"""The schema check every connito.<kind>/<version> reader shares: the file, found and expected schema, the fix."""

import json

import pytest

from connito.common.records import RecordError, check_schema, read_json_record

FIX = "write it again with `connito probe`"


def _write(path, record):
    path.write_text(json.dumps(record))
    return path


def test_a_record_of_the_expected_schema_is_returned(tmp_path):
    path = _write(tmp_path / "r.json", {"schema": "connito.probe/1", "x": 1})
    assert read_json_record(path, "connito.probe/1", what="probe record", fix=FIX) == {"schema": "connito.probe/1",
                                                                                      "x": 1}  # fmt: skip


def test_another_kind_a_newer_and_an_older_version_are_refused_with_the_exact_message(tmp_path):
    path = _write(tmp_path / "r.json", {"schema": "connito.mask/1"})
    with pytest.raises(RecordError) as caught:
        read_json_record(path, "connito.probe/2", what="probe record", fix=FIX)
    assert str(caught.value) == (
        f"{path} is not a probe record: schema 'connito.mask/1', expected 'connito.probe/2'; {FIX}"
    )
    _write(path, {"schema": "connito.probe/3"})
    with pytest.raises(RecordError) as caught:
        read_json_record(path, "connito.probe/2", what="probe record", fix=FIX)
    assert str(caught.value) == (
        f"{path} is a probe record of schema 'connito.probe/3', newer than this Connito reads ('connito.probe/2'): "
        f"upgrade Connito, or {FIX}"
    )
    _write(path, {"schema": "connito.probe/1"})
    with pytest.raises(RecordError, match=r"of the older schema 'connito.probe/1'; this Connito reads 'connito.pro"):
        read_json_record(path, "connito.probe/2", what="probe record", fix=FIX)


def test_absent_not_utf8_not_json_and_not_an_object_name_the_file(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(RecordError, match=f"^no probe record at {path}: write it again"):
        read_json_record(path, "connito.probe/1", what="probe record", fix=FIX)
    path.write_bytes(b'{"schema": "\xff"}')
    with pytest.raises(RecordError, match=f"^{path} is not UTF-8 text \\(byte 12\\); write it again"):
        read_json_record(path, "connito.probe/1", what="probe record", fix=FIX)
    path.write_text("{")
    with pytest.raises(RecordError, match=f"^{path} is not valid JSON"):
        read_json_record(path, "connito.probe/1", what="probe record", fix=FIX)
    path.write_text("[1]")
    with pytest.raises(RecordError, match=f"^{path} is not a probe record: schema None, expected 'connito.probe/1'"):
        read_json_record(path, "connito.probe/1", what="probe record", fix=FIX)


def test_the_error_class_is_the_readers_own():
    class MaskError(ValueError):
        pass

    with pytest.raises(MaskError):
        check_schema("connito.mask/9", "m.json", "connito.mask/1", what="mask file", fix=FIX, error=MaskError)


def test_a_json_record_keeps_the_files_key_order_layout_and_optional_keys(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from connito.common.records import JsonRecord

    @dataclass(frozen=True, kw_only=True)
    class Probe(JsonRecord):
        SCHEMA: ClassVar[str] = "connito.probe/1"
        SCHEMA_KEY: ClassVar[str] = "format"
        INDENT: ClassVar[int | None] = 1
        END: ClassVar[str] = ""
        WHAT: ClassVar[str] = "probe record"
        FIX: ClassVar[str] = FIX
        OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"extra"})

        z: int
        a: list[int]
        extra: str | None = None

    path = Probe(z=1, a=[2]).save(tmp_path / "sub" / "p.json")  # the directory is made
    assert path.read_text() == json.dumps({"format": "connito.probe/1", "z": 1, "a": [2]}, indent=1)
    assert Probe.load(path) == Probe(z=1, a=[2]) and Probe(z=1, a=[2], extra="x").to_dict()["extra"] == "x"
    path.write_text(json.dumps({"format": "connito.probe/1", "a": [2]}))
    with pytest.raises(RecordError) as caught:
        Probe.load(path)
    assert str(caught.value) == f"{path} lacks ['z']: {FIX}"
