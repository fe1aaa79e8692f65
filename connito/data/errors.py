"""The one error type of the data layer."""

from connito.common.errors import UserError


class DataError(UserError, ValueError):
    """Bad or unobtainable training data, raised before any training starts.

    Every message names the problem and the fix (which file, which column, which setting).
    """
