"""Catch mistyped override keys before Hydra does, and suggest the key that was meant.

Hydra's own message for an unknown key advises ``+key=value``, which a typed config refuses too; a user who
typed ``train.stepz=10`` wants to hear about ``train.steps``.
"""

import dataclasses
import difflib
import re

from omegaconf import DictConfig, OmegaConf

_KEY = re.compile(r"^([A-Za-z_][\w.]*)=")


def _keys(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for name in node:
        child = node._get_node(name)
        full = f"{prefix}{name}"
        out.append(full)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            out.extend(_keys(child, full + "."))
    return out


def _suggestion(key: str, keys: list[str], is_leaf: bool) -> str:
    """`` Did you mean '<key>'?`` for the option meant, or ``""``. A leaf that exists under another group
    (``engine.ep_size`` for ``parallel.ep_size``) is that option, whatever the spelling of the group; else the
    closest spelling."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [other for other in keys if other.rsplit(".", 1)[-1] == leaf] if is_leaf else []
    if same_leaf:
        return " Did you mean " + " or ".join(f"'{other}'" for other in same_leaf) + "?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_key_message(schema, args: list[str], command: str) -> str | None:
    """The error for the first override whose key the typed ``schema`` does not have, else None.

    Keys under free-form dict fields (``model.hf_config.*``) and Hydra's own (``hydra.*``, ``+``/``~``
    prefixes) are left to Hydra.
    """
    root = OmegaConf.structured(schema)
    for arg in args:
        match = _KEY.match(arg)
        if not match or match.group(1).startswith("hydra."):
            continue
        node: object = root
        parts = match.group(1).split(".")
        for depth, part in enumerate(parts):
            if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))):
                break  # inside a free-form dict: anything goes
            if part not in node:
                key = ".".join(parts[: depth + 1])
                hint = _suggestion(key, _keys(root), is_leaf=depth == len(parts) - 1)
                return (
                    f"connito {command}: '{key}' is not a Connito option.{hint} "
                    f"`connito {command} --cfg job` prints every option with its value."
                )
            node = node._get_node(part)
    return None
