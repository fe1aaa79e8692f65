"""Callbacks and loss terms: how methods plug into the one trainer (see :mod:`.base`)."""

# registers the built-in callbacks "trainable", "expert_choice" and "expert_threshold"
from connito.training.callbacks import routing_modes, trainable  # noqa: F401
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
