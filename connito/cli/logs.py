"""Console logging for the CLI: Connito's loggers at INFO, the libraries' chatter at WARNING."""

import logging
import os

LIBRARY_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_SILENT": "true",
}
"""Environment defaults of the libraries below Connito. ``datasets`` and ``huggingface_hub`` read
``HF_HUB_OFFLINE`` once, when first imported, so these are set before anything imports them; a value the user
exported wins (``HF_HUB_OFFLINE=0 connito ...`` to reach the Hugging Face Hub)."""


def set_library_env_defaults() -> None:
    """Called first thing in ``connito.cli.main.main``, before any command module is imported."""
    for name, value in LIBRARY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def quiet_libraries() -> None:
    """Libraries' loggers at WARNING; called inside the Hydra app, after Hydra configured logging."""
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "datasets", "httpx", "wandb", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)
