"""Console logging for the CLI: Connito's loggers at INFO, the libraries' chatter at WARNING."""

import logging
import os


def quiet_libraries() -> None:
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "datasets", "httpx", "wandb", "compilers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("WANDB_SILENT", "true")
