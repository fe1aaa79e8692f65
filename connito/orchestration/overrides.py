"""Write config values as Hydra command-line overrides, so a job's command line carries exactly the settings its
orchestrator was given (``data.domains=['code']``, ``data.cache_dir='~/.cache/connito'``)."""

from __future__ import annotations

import dataclasses
from typing import Any


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: strings quoted (every character kept), lists bracketed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a command-line override")


def changed_overrides(prefix: str, config: Any, **replace: Any) -> list[str]:
    """``prefix.key=value`` for every field of the dataclass ``config`` that differs from its default (after
    ``replace``), nested dataclasses flattened."""
    config = dataclasses.replace(config, **replace) if replace else config
    default = type(config)()
    out = []
    for field in dataclasses.fields(config):
        value, base = getattr(config, field.name), getattr(default, field.name)
        if dataclasses.is_dataclass(value):
            out += changed_overrides(f"{prefix}.{field.name}", value)
        elif value != base or field.name in replace:
            out.append(f"{prefix}.{field.name}={override_value(value)}")
    return out
