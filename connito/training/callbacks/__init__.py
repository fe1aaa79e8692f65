"""Callbacks and loss terms: how methods plug into the one trainer (see :mod:`.base`)."""

from connito.training.callbacks import trainable  # noqa: F401  (registers the built-in "trainable" callback)
from connito.training.callbacks.base import (
    Callback,
    CallbackError,
    LossTerm,
    MicroBatch,
    build_callbacks,
    check_loss_value,
    import_plugins,
    register_callback,
    registered_callbacks,
    resolve_callback,
)

__all__ = [
    "Callback",
    "CallbackError",
    "LossTerm",
    "MicroBatch",
    "build_callbacks",
    "check_loss_value",
    "import_plugins",
    "register_callback",
    "registered_callbacks",
    "resolve_callback",
]
