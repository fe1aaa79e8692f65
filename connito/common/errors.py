"""The base class of errors a user causes and can fix: bad input, not a bug in Connito; and of failures the
message reports in full (:class:`ReportedFailure`: a pipeline whose job failed).

The ``connito`` command prints such an error's message alone (one line, exit status 2), without a Python
traceback; ``connito --traceback ...`` (or ``CONNITO_TRACEBACK=1``) shows the traceback as well. Any other
exception is a bug and keeps its traceback. What else the command treats as a user error (a ``ValueError`` raised
by Connito's own code, a file it cannot read or write, a config Hydra cannot compose) is in
:mod:`connito.cli.errors`.
"""


class UserError(Exception):
    """Bad input (a path, a value, a file's content) a user can fix; the message names the input and the fix."""


class ReportedFailure(Exception):
    """A run that failed for a reason its message reports in full, with what to do (a pipeline job that failed:
    which one, its log, how to run only the unfinished jobs). Neither bad input nor a bug in Connito: the
    ``connito`` command prints the message without a traceback and exits with status 1 (``--traceback`` shows it)."""
