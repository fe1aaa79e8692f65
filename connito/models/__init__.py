"""Model families and loading (layer 1). Everything above talks to models through this package."""

from connito.models.config import ModelConfig
from connito.models.families import FAMILIES, Family, ModelError, get_family
from connito.models.loading import build_model, validate_checkpoint_dir

__all__ = ["FAMILIES", "Family", "ModelConfig", "ModelError", "build_model", "get_family", "validate_checkpoint_dir"]
