"""Where the Hydra configs are: ``configs/`` of a source checkout, or ``connito/_configs`` of an installed copy.

The lookup lives in :mod:`connito.models.presets` (the pipelines read model presets without importing the CLI);
the commands and tests keep importing it from here.
"""

from connito.models.presets import config_dir

__all__ = ["config_dir"]
