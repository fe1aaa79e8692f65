"""Files and directories written atomically: a reader sees the old content or the new, never half a file.

Every Connito writer of a file another process or a later run reads (records, job states, checkpoints' pointers,
prepared data) goes through here instead of its own temp-file-and-rename copy:

* :func:`atomic_open` (and :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json` on
  it) writes a temporary file in the target's own directory (same file system, so the rename is atomic), flushes
  and fsyncs it, then ``os.replace``-s it over the target. If the writer raises (a serializer that fails half way,
  a full disk, Ctrl-C) the temporary file is removed and the old target is left as it was.
* :func:`atomic_replace_dir` yields an empty directory beside the target; on a clean exit it takes the target's
  place (the old contents are deleted only once the new directory is in place), on an error it is deleted.

A target Connito may not write (a read-only directory, another user's) raises :class:`UnwritableError`, which
names the path and the fix instead of the bare ``[Errno 13] Permission denied: '.x.tmp'``.

This module is layer 0 (``connito/common``): plain Python, importing no other Connito package, so the lowest
layers (``models/``, ``experts/``, ``data/``) use it as freely as the training loop and the methods do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from connito.common.errors import UserError

_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class UnwritableError(UserError, PermissionError):
    """Connito may not write where it was told to; the message names the path and the fix."""


def _unwritable(path: Path, err: OSError) -> UnwritableError:
    if err.errno == errno.EROFS:
        reason = "a read-only file system"
    elif err.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    else:
        reason = (err.strerror or type(err).__name__).lower()
    error = UnwritableError(
        f"cannot write {path} ({reason} in {path.parent}): choose an out= (or output path) in a directory you can "
        f"write to, or make {path.parent} writable"
    )
    error.errno = err.errno
    return error


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _NOT_WRITABLE:
            raise _unwritable(path, err) from None
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); on a clean exit it is
    fsynced and replaces ``path``; on an error it is removed and ``path`` keeps its old content (or stays absent).
    The parent directory is created. The new file gets the usual permissions (0666 less the umask)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    _make_parent(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:  # the directory exists (made above) but takes no new file
        raise _unwritable(path, err) from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1, end: str = "", **dumps: Any) -> Path:
    """``json.dump(obj, indent=indent, **dumps)`` then ``end`` (e.g. ``"\\n"``) to ``path`` atomically; a value
    the encoder refuses half way leaves ``path`` as it was. Returns ``path``."""
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=indent, **dumps)
        handle.write(end)
    return Path(path)


def _new_dir(out: Path, what: str) -> Path:
    """A new empty directory beside ``out`` with the usual permissions (0777 less the umask; mkdtemp's 0700 would
    hide a checkpoint from the other users of a shared file system)."""
    path = out.with_name(f".{out.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(path, 0o777)
    return path


@contextlib.contextmanager
def atomic_replace_dir(out: str | Path, *, stage_name: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on a clean exit it replaces ``out`` (whose old contents
    are deleted only once the new directory is in place), on an error it is deleted and ``out`` is untouched.

    ``stage_name``: a fixed name for the temporary directory, for a writer that is alone by construction (rank 0 of
    a run): a leftover of a killed attempt under that name is deleted first instead of staying beside ``out``
    (which matters for a checkpoint's size). Without it the name is unique (writers may race)."""
    out = Path(out)
    _make_parent(out)
    try:
        if stage_name is None:
            stage = _new_dir(out, "partial")
        else:
            stage = out.with_name(stage_name)
            shutil.rmtree(stage, ignore_errors=True)
            os.mkdir(stage, 0o777)
    except OSError as err:  # the directory exists (made above) but takes no new entry
        raise _unwritable(out, err) from None
    try:
        yield stage
        old = None
        if out.exists():
            old = _new_dir(out, "old")
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
