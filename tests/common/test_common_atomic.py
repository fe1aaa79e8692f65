"""Atomic writes: the old file survives a writer that fails half way; an unwritable target names the path and fix."""

import json
import os
import stat

import pytest

from connito.common.atomic import (
    UnwritableError,
    atomic_open,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


class Unserialisable:
    pass


def _refuse(value):
    raise TypeError(f"cannot serialise {type(value).__name__}")


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "record.json"
    atomic_write_json(target, {"a": [1, 2]}, end="\n")
    assert target.read_text() == json.dumps({"a": [1, 2]}, indent=1) + "\n"
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask, "the usual permissions, not mkstemp's 0600"


def test_a_serializer_that_raises_half_way_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old content")
    record = {"first": list(range(100)), "then": Unserialisable()}
    with pytest.raises(TypeError, match="cannot serialise Unserialisable"):
        atomic_write_json(target, record, default=_refuse)
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"], "the temporary file is removed"


def test_an_error_inside_atomic_open_leaves_an_absent_target_absent(tmp_path):
    target = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target, "wb") as handle:
            handle.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_target_names_the_path_and_the_fix(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UnwritableError) as caught:
            atomic_write_text(locked / "analysis.json", "x")
        with pytest.raises(UnwritableError, match="cannot write .*locked/out"):
            with atomic_replace_dir(locked / "out"):
                pass
    finally:
        locked.chmod(0o700)
    assert str(caught.value) == (
        f"cannot write {locked / 'analysis.json'} (permission denied in {locked}): choose an out= (or output path) in "
        f"a directory you can write to, or make {locked} writable"
    )
    assert isinstance(caught.value, PermissionError)


def test_an_unwritable_parent_directory_is_reported_the_same_way(tmp_path, monkeypatch):
    """As root the permission bits do not bite: simulate the kernel's answer."""
    import errno

    def refuse(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "mkdir", lambda path, mode=0o777: refuse(path, 0))
    with pytest.raises(UnwritableError) as caught:
        atomic_write_text(tmp_path / "x.json", "x")
    assert str(caught.value) == (
        f"cannot write {tmp_path / 'x.json'} (permission denied in {tmp_path}): choose an out= (or output path) in "
        f"a directory you can write to, or make {tmp_path} writable"
    )
    assert isinstance(caught.value, PermissionError) and caught.value.errno == errno.EACCES
    with pytest.raises(UnwritableError, match=r"cannot write .*/model \(permission denied in .*\): choose an out="):
        with atomic_replace_dir(tmp_path / "model"):
            pass


def test_atomic_replace_dir_swaps_only_on_success(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_replace_dir(out) as stage:
            (stage / "new.txt").write_text("new")
            raise RuntimeError("export failed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_replace_dir(out) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, "the usual permissions, not mkdtemp's 0700"


def test_a_directory_that_takes_no_new_entry_names_the_path_and_the_fix(tmp_path, monkeypatch):
    import errno

    def refuse(path, *args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    def refuse_temporary(path, mode=0o777):  # like /proc: the directory is there, a new entry is not possible
        if os.path.basename(path).startswith("."):
            refuse(path)
        return mkdir(path, mode)

    mkdir = os.mkdir
    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(os, "mkdir", refuse_temporary)
    with pytest.raises(UnwritableError) as caught:
        atomic_write_text(tmp_path / "x.json", "x")
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'x.json'} (no such file or directory in {tmp_path})")
    with pytest.raises(UnwritableError, match=r"cannot write .*/model \(no such file or directory in "):
        with atomic_replace_dir(tmp_path / "model"):
            pass


def test_a_fixed_stage_name_clears_a_killed_attempts_leftover(tmp_path):
    out = tmp_path / "universal"
    leftover = tmp_path / ".universal.tmp"
    leftover.mkdir()
    (leftover / "half.pt").write_text("from a killed conversion")
    with atomic_replace_dir(out, stage_name=".universal.tmp") as stage:
        assert stage == leftover and list(stage.iterdir()) == []
        (stage / "done.pt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["universal"] and (out / "done.pt").read_text() == "whole"
