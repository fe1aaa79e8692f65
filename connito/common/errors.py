"""The base class of errors a user causes and can fix: bad input, not a bug in Connito.

The ``connito`` command prints such an error's message alone (one line, exit status 2), without a Python
traceback; ``connito --traceback ...`` (or ``CONNITO_TRACEBACK=1``) shows the traceback as well. Any other
exception is a bug and keeps its traceback. What else the command treats as a user error (a ``ValueError`` raised
by Connito's own code, a file it cannot read or write, a config Hydra cannot compose) is in
:mod:`connito.cli.errors`.
"""


class UserError(Exception):
    """Bad input (a path, a value, a file's content) a user can fix; the message names the input and the fix."""
