"""What the ``connito`` command reports as a user error: one line, no traceback, exit status 2.

A user error is
- a :class:`connito.common.errors.UserError` (``ModelError``, ``DataError`` and their kin derive from it);
- a ``ValueError`` raised by Connito's own code: Connito raises ``ValueError`` only to refuse bad input, with a
  message naming the fix (a ``ValueError`` raised inside a library is a bug and keeps its traceback);
- a file or directory the command cannot read or write (an ``OSError`` naming it: missing, no permission,
  read-only, disk full; or one Connito raised with its own message);
- an override Hydra cannot parse or merge into the typed config (``keep=abc``), before the command starts.

A :class:`connito.common.errors.ReportedFailure` (a pipeline whose job failed: which one, its log, how to run only
the unfinished jobs) is neither: its message is printed alone and the command exits with status 1.

Everything else is a bug: its traceback is printed as Python prints it. ``--traceback`` (anywhere on the command
line) or ``CONNITO_TRACEBACK=1`` prints the traceback of user errors too.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from types import TracebackType

EXIT_USER_ERROR = 2
"""The exit status of a user error (as for a wrong command line); a bug exits 1."""
EXIT_FAILURE = 1
"""The exit status of a :class:`~connito.common.errors.ReportedFailure` (as of a bug, but without a traceback)."""

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "CONNITO_TRACEBACK"

_CONNITO = Path(__file__).resolve().parents[1]

_OS_FIXES = {
    errno.ENOENT: "check the path (relative paths resolve against {cwd})",
    errno.EACCES: "choose a path you may use, or change its permissions",
    errno.EPERM: "choose a path you may use, or change its permissions",
    errno.EROFS: "it is on a read-only file system: choose a path on a writable one",
    errno.ENOSPC: "the disk is full: free space or choose a path on another disk",
    errno.EISDIR: "give a file here, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EEXIST: "it exists already: choose another path",
}


def wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _raised_in_connito(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of ``tb`` (where the exception was raised) is Connito's code."""
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    try:
        return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(_CONNITO)
    except (OSError, ValueError):
        return False


def _os_message(err: OSError) -> str | None:
    if err.filename is None:  # a message of Connito's own (connito.common's UnwritableError) or none at all
        return err.strerror if err.strerror and err.errno in _OS_FIXES else None
    fix = _OS_FIXES.get(err.errno or 0)
    if fix is None:
        return None
    where = f"'{err.filename}'" + (f" -> '{err.filename2}'" if err.filename2 else "")
    return f"{where}: {err.strerror or err}; {fix.format(cwd=os.getcwd())}"


def _config_message(err: Exception) -> str | None:
    """One line for an override Hydra could not parse or merge (``keep=abc``, ``+key=1``), else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(err, HydraException | OmegaConfBaseException):
        return None
    parts = [str(err)]
    if isinstance(err.__cause__, OmegaConfBaseException):
        parts.append(str(err.__cause__))
    text = "\n".join(parts).split("Config search path:")[0]  # Hydra's search path is no help to a user
    head, _, options = text.partition("Available options in ")
    lines = [line.strip() for line in head.splitlines()]
    kept = [line for line in lines if line and not line.startswith(("full_key:", "object_type=", "reference_type="))]
    message = "; ".join(dict.fromkeys(kept))
    if options:  # a config group option that does not exist: list the ones that do, on the same line
        group, _, names = options.partition(":")
        message += f"; the options of {group} are {', '.join(name.strip() for name in names.split())}"
        return message
    return message + ". `connito <command> --cfg job` prints every option with its value"


def user_message(err: BaseException, command: str, started: bool) -> str | None:
    """The line to print for ``err`` raised by ``connito <command>`` when it is a user error, else None (a bug).

    ``started``: whether the command's own code had begun (a Hydra or OmegaConf error before that is the user's
    override; after it, a bug)."""
    from connito.common.errors import UserError

    message: str | None = None
    if isinstance(err, UserError) or (isinstance(err, ValueError) and _raised_in_connito(err.__traceback__)):
        message = str(err)
    elif isinstance(err, Exception) and not started and (message := _config_message(err)) is not None:
        message = message.replace("<command>", command)
    elif isinstance(err, OSError):
        message = _os_message(err)
        if message is None and err.errno is None and _raised_in_connito(err.__traceback__):
            message = str(err)  # Connito's own FileNotFoundError("no adapt.json at ...: ...")
    if message is None:
        return None
    prefix = f"connito {command}"
    return message if message.startswith(prefix) else f"{prefix}: {message}"


def exit_if_user_error(err: BaseException, command: str, started: bool) -> None:
    """Print ``err``'s line and exit with :data:`EXIT_USER_ERROR` when it is a user error, or its message and exit
    with :data:`EXIT_FAILURE` when it is a :class:`~connito.common.errors.ReportedFailure` (in both cases only when
    no traceback was asked for); return otherwise (the caller re-raises)."""
    from connito.common.errors import ReportedFailure

    if wants_traceback():
        return
    line = user_message(err, command, started)
    if line is not None:
        print(line, file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if isinstance(err, ReportedFailure):
        message, prefix = str(err), f"connito {command}"
        print(message if message.startswith(prefix) else f"{prefix}: {message}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)
