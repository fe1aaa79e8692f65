"""Callbacks by name: ``callbacks={<name>: {options}}`` in a config builds the class the name stands for.

Connito's own callbacks are listed in one table, :data:`BUILTIN_CALLBACKS` (name -> ``"module.path:ClassName"``),
and imported when a name is looked up, not before: a run that never asks for ``des_moe`` never imports DES-MoE, and
:func:`connito.training.trainer.run_training` called from plain Python finds every built-in without importing the
method packages first. The table names method packages (layer 5) by string only: the training layer never imports
them (the layering test reads ``import`` statements; this table holds none).

A user's callbacks register with :func:`register_callback` in a module the run imports (``plugins='[my_pkg.m]'``);
a registered name wins over the table only with ``replace=True``.

Adding a built-in callback: write the class (a :class:`~connito.training.callbacks.base.Callback`), add one line
here. ``tests/training/test_callback_table.py`` fails when a Callback class of Connito is neither in the table nor
built by the trainer itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from connito.training.callbacks.base import Callback, CallbackError

BUILTIN_CALLBACKS: dict[str, str] = {
    "trainable": "connito.training.callbacks.trainable:Trainable",
    "expert_choice": "connito.training.callbacks.routing_modes:ExpertChoice",
    "expert_threshold": "connito.training.callbacks.routing_modes:ExpertThreshold",
    "des_moe": "connito.adaptation.des_moe.callback:DesMoe",
    "fft_moe": "connito.composition.fft_moe.callback:FftMoe",
    "progressive_prune": "connito.retirement.progressive:ProgressivePrune",
}
"""Connito's callbacks by config name: ``"module.path:ClassName"``, imported on lookup."""

_REGISTRY: dict[str, type[Callback]] = {}


def register_callback(name: str, *, replace: bool = False):
    """Class decorator: make ``callbacks={<name>: {...}}`` build this callback (a user's callback; Connito's own
    are in :data:`BUILTIN_CALLBACKS`). ``replace=True`` overrides a registered or built-in name."""

    def decorate(cls: type[Callback]) -> type[Callback]:
        taken = (name in _REGISTRY and _REGISTRY[name] is not cls) or (
            name in BUILTIN_CALLBACKS and name not in _REGISTRY
        )
        if taken and not replace:
            where = "built in" if name in BUILTIN_CALLBACKS and name not in _REGISTRY else "already registered"
            raise CallbackError(
                f"a callback named '{name}' is {where}; pass replace=True to override it, or choose another name"
            )
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_callbacks() -> list[str]:
    """Every name a config can use: the built-in table and what was registered."""
    return sorted(set(BUILTIN_CALLBACKS) | set(_REGISTRY))


def _import_builtin(name: str) -> type[Callback]:
    target = BUILTIN_CALLBACKS[name]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CallbackError(f"built-in callback '{name}' ({target}) failed to import: {err}") from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise CallbackError(f"built-in callback '{name}': {target} is not a Callback class")
    return cls


def resolve_callback(name: str) -> type[Callback]:
    """The class ``name`` stands for: a registered callback, else a built-in (imported now)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN_CALLBACKS:
        return _import_builtin(name)
    raise CallbackError(
        f"callback '{name}' is not registered (registered: {', '.join(registered_callbacks())}). Register it with "
        "@connito.training.callbacks.register_callback in a module the run imports: plugins='[my_pkg.callbacks]'"
    )


def import_plugins(modules: list[str]) -> None:
    """Import the modules a config names under ``plugins`` (they register callbacks, families, ...)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise CallbackError(
                f"plugins: cannot import '{module}' ({err}). Name an importable module (on PYTHONPATH or installed)"
            ) from err


def build_callbacks(specs: Mapping[str, Mapping[str, Any] | None]) -> list[Callback]:
    """The callbacks a config asks for, in its order: ``{name: keyword arguments}``."""
    callbacks = []
    for name, kwargs in specs.items():
        cls = resolve_callback(name)
        try:
            callback = cls(**dict(kwargs or {}))
        except TypeError as err:
            raise CallbackError(
                f"callback '{name}' ({cls.__name__}) rejected its options {dict(kwargs or {})}: {err}"
            ) from err
        callback.name = name
        callbacks.append(callback)
    return callbacks
