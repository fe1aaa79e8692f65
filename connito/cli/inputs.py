"""What a command reads and where it writes, by config key, for every command at once: an output that is, is
inside, or holds an input is refused before anything runs, and so is ``overwrite=true`` on a directory Connito did
not write (:func:`check_paths`, called by :func:`connito.cli.command.hydra_app` once the config is typed).

A new command's path options need no code here when they use these names; ``tests/cli/test_inputs.py`` fails for a
path-like option of any command that is in none of :data:`INPUTS`, :data:`OUTPUTS` and :data:`NEITHER`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from connito.common.errors import UserError

INPUTS: dict[str, str] = {
    "checkpoint": "the checkpoint",
    "model_path": "the model",
    "model.path": "the model",
    "base": "the base checkpoint",
    "base.path": "the base checkpoint",
    "seed.path": "the seed checkpoint",
    "public.path": "the public checkpoint",
    "delta": "the delta package",
    "analysis_path": "the analysis",
    "esft.mask_file": "the mask file",
    "data.files": "a data file",
    "data.tokenizer_path": "the tokenizer",
    "runs": "a run",
}
"""Config key -> what it names: read, never written."""

CHECKPOINTS = ("checkpoint", "model_path", "model.path", "base", "base.path", "seed.path", "public.path")
"""The input keys that name a model checkpoint (or a run directory with its ``hf/`` export)."""

OUTPUTS = ("out", "out_dir")
"""Config keys naming where a command writes (a directory; ``connito select``'s ``out`` is a file)."""

NEITHER = ("run.root", "data.cache_dir", "opt_out", "experts", "analysis")
"""Path-like keys that are neither: the pipelines' run root (jobs resume from what they wrote there), the data cache
(Connito's own), and values that are not paths."""

MAY_HOLD_OUTPUT = {("analyze", "model_path"), ("select", "analysis_path")}
"""(command, input key) pairs whose directory holds the command's output by design: ``connito analyze`` writes
``<checkpoint>/analysis``, ``connito select`` the mask file beside ``analysis.json``."""


class PathError(UserError, ValueError):
    """An output that would write into an input, or replace a directory Connito did not write."""


def config_value(cfg: Any, key: str) -> Any:
    """``cfg``'s value at the dotted ``key``; None when a part is missing."""
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _input_paths(command: str, cfg: Any, key: str) -> list[Path]:
    value = config_value(cfg, key)
    values = list(value) if isinstance(value, list | tuple) else [value]
    paths = []
    for item in values:
        if not isinstance(item, str) or not item:
            continue
        if key == "data.files":
            paths += [Path(p) for p in sorted(glob.glob(os.path.expanduser(item), recursive=True))]
            continue
        path = Path(item).expanduser()
        if key == "analysis_path" and path.is_dir():
            path = path / "analysis.json"  # what is read; the directory may hold the outputs (mask files)
        paths.append(path)
    if key == "analysis_path" and value == "" and isinstance(config_value(cfg, "checkpoint"), str):
        checkpoint = Path(config_value(cfg, "checkpoint")).expanduser()  # the default: <checkpoint>/analysis
        paths += [candidate / "analysis.json" for candidate in (checkpoint / "analysis", checkpoint.parent / "analysis")
                  if (candidate / "analysis.json").is_file()]  # fmt: skip
    return paths


def inputs_of(command: str, cfg: Any) -> list[tuple[str, str, Path]]:
    """(key, what it is, resolved path) of every input ``cfg`` names (existing or not; data.files: the files its
    patterns match)."""
    found = []
    for key, what in INPUTS.items():
        for path in _input_paths(command, cfg, key):
            found.append((key, what, path.resolve()))
    return found


def is_connito_output(path: Path) -> bool:
    """Whether the directory ``path`` is one a Connito command wrote: every checkpoint Connito writes carries its
    ``connito_<kind>.json`` provenance file, a delta package its ``manifest.json``, a run or pipeline
    ``connito_state.json``, ``connito analyze`` its ``analysis.json``."""
    markers = ("connito_*.json", "manifest.json", "analysis.json", "*_report.json")
    return any(next(path.glob(pattern), None) is not None for pattern in markers)


def check_paths(command: str, cfg: Any) -> None:
    """Refuse, before anything is read or written, an output (``out=``, ``out_dir=``) that is, is inside, or holds
    one of the command's inputs, ``overwrite=true`` on a non-empty directory Connito did not write, and an input
    checkpoint with a truncated or corrupt safetensors file."""
    check_outputs(command, cfg)
    for key, _, path in inputs_of(command, cfg):
        for directory in (path, path / "hf"):  # a run directory stands for its hf/ export
            if key in CHECKPOINTS and (directory / "config.json").is_file():
                check_family(key, directory)
            if directory.is_dir() and next(directory.glob("*.safetensors"), None) is not None:
                from connito.models.loading import check_safetensors_files

                check_safetensors_files(directory)


def check_family(key: str, checkpoint: Path) -> None:
    """Refuse a checkpoint whose ``model_type`` no Connito family has, listing the families there are."""
    import json

    from connito.models.families import known_families

    try:
        model_type = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        return  # not a JSON object: loading the checkpoint says so, naming the file
    if isinstance(model_type, str) and model_type not in known_families():
        raise PathError(
            f"{key}='{checkpoint}' is a '{model_type}' model, not a family Connito supports: "
            f"{', '.join(known_families())}. Point {key} at a checkpoint of one of them, or register the family with "
            "connito.models.register_family (if it is newer than your transformers, upgrading transformers may "
            "also be needed)"
        )


def check_writable(out_key: str, value: str, out: Path) -> None:
    """Refuse, before any work, an output whose directory cannot be written: every writer stages its output beside
    it (in ``out``'s parent) and renames it into place, so the nearest existing directory above ``out`` must take
    new entries."""
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(
            f"{out_key}='{value}': '{existing}' is a file, not a directory. Choose an {out_key} whose parent "
            "directories are directories"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PathError(
            f"{out_key}='{value}': cannot write in '{existing}' (no permission, or a read-only file system). Choose "
            f"an {out_key} in a directory you can write to, or make '{existing}' writable"
        )


def check_outputs(command: str, cfg: Any) -> None:
    """The output checks of :func:`check_paths`."""
    for out_key in OUTPUTS:
        value = config_value(cfg, out_key)
        if not isinstance(value, str) or not value:
            continue
        out = Path(value).expanduser().resolve()
        for key, what, path in inputs_of(command, cfg):
            inside = out.is_relative_to(path) and out != path
            if inside and (command, key) in MAY_HOLD_OUTPUT:
                continue
            if out == path or inside or path.is_relative_to(out):
                where, fix = (
                    ("is", f"a new {out_key}") if out == path
                    else ("is inside", f"an {out_key} outside '{path}'") if inside
                    else ("holds", f"an {out_key} that does not contain '{path}'")
                )  # fmt: skip
                raise PathError(
                    f"{out_key}='{value}' {where} {what} ({key}='{config_value(cfg, key) or path}'): Connito never "
                    f"writes into its inputs. Choose {fix}"
                )
        check_writable(out_key, value, out)
        if config_value(cfg, "overwrite") is True and out.is_dir() and any(out.iterdir()):
            if not is_connito_output(out):
                raise PathError(
                    f"{out_key}='{value}' is a non-empty directory Connito did not write (no connito_*.json, "
                    "manifest.json or analysis.json in it), and overwrite=true would replace it whole. Choose a new "
                    f"{out_key}, or empty or delete that directory yourself"
                )
