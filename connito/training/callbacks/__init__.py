"""Callbacks and loss terms: how methods plug into the one trainer (see :mod:`.base`); callbacks by name, Connito's
own from one lazily imported table (see :mod:`.registry`)."""

from connito.training.callbacks.base import Callback, CallbackError, LossTerm, MicroBatch, check_loss_value
from connito.training.callbacks.registry import (
    BUILTIN_CALLBACKS,
    build_callbacks,
    import_plugins,
    register_callback,
    registered_callbacks,
    resolve_callback,
)

__all__ = [
    "BUILTIN_CALLBACKS",
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
