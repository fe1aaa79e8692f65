"""Expert delta packages: what an adaptation run trained, as safetensors plus a manifest, and base + delta back to a
full Hugging Face checkpoint.

    manifest = save_delta(trained, "ckpt/base", "deltas/legal", experts=mask, modules=["*.mlp.gate.weight"])
    delta = load_delta("deltas/legal")          # manifest + sha256 of every file checked; never unpickles
    apply_delta("ckpt/base", "deltas/legal", "ckpt/legal")   # = `connito apply base=... delta=... out=...`

The manifest schema (``connito.delta/1``) is described in :mod:`connito.experts.delta.manifest`.
"""

from connito.experts.delta.apply import apply_delta
from connito.experts.delta.manifest import SCHEMA, DeltaError, DeltaManifest
from connito.experts.delta.package import (
    Delta,
    changed_experts,
    changed_modules,
    load_delta,
    read_manifest,
    save_delta,
)

__all__ = [
    "SCHEMA",
    "Delta",
    "DeltaError",
    "DeltaManifest",
    "apply_delta",
    "changed_experts",
    "changed_modules",
    "load_delta",
    "read_manifest",
    "save_delta",
]
