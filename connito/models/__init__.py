"""Model families and loading (layer 1). Everything above talks to models through this package.

The family table and the config import at once; loading (transformers) on first use, so reading a config stays
fast.
"""

from connito.models.config import ModelConfig
from connito.models.families import (
    AutoEPSupport,
    Family,
    ModelError,
    MoELayout,
    get_family,
    known_families,
    moe_families,
    register_family,
)

_LAZY = {"build_model", "validate_checkpoint_dir"}

__all__ = [
    "AutoEPSupport",
    "Family",
    "ModelConfig",
    "ModelError",
    "MoELayout",
    "build_model",
    "get_family",
    "known_families",
    "moe_families",
    "register_family",
    "validate_checkpoint_dir",
]


def __getattr__(name: str):
    if name in _LAZY:
        from connito.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'connito.models' has no attribute '{name}'")
