"""A model's fingerprint: what later steps check before they trust a file computed from a model.

``analysis.json`` and expert masks carry the fingerprint of the model they were computed on; a step handed one of
another model refuses it. The fingerprint is the sha256 of the checkpoint's ``config.json`` (keys sorted) and of
every safetensors weight file's bytes, so re-saving the same weights gives the same fingerprint and any change
of a weight or of the architecture gives another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from connito.models.families import ModelError

CHUNK = 1 << 20


def checkpoint_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a ``save_pretrained`` directory's config and safetensors files."""
    path = Path(path).expanduser()
    config_file = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not config_file.is_file() or not weights:
        raise ModelError(f"{path} is not a save_pretrained checkpoint with safetensors weights: cannot fingerprint it")
    digest = hashlib.sha256()
    config = json.loads(config_file.read_text())
    config.pop("transformers_version", None)  # the writer's version, not the model
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weight in weights:
        digest.update(weight.name.encode())
        with open(weight, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def check_fingerprint(expected: str, path: str | Path, what: str, fix: str | None = None) -> None:
    """Refuse ``what`` (a file computed on another model) when ``path``'s fingerprint is not ``expected``. ``fix``
    (a sentence) replaces the default advice, which is to recompute the analysis on this model."""
    actual = checkpoint_fingerprint(path)
    if actual != expected:
        fix = fix or f"Recompute it on this model (connito analyze model_path={path})"
        raise ModelError(
            f"{what} was computed on another model (fingerprint {expected[:19]}...), not on {path} "
            f"({actual[:19]}...). {fix}"
        )
