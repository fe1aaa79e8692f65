"""Data layer: offline multi-domain corpus, byte-level BPE tokenizer, packed rows with domain labels.

The config and errors import at once; the preparation code (``datasets``, ``tokenizers``) loads on first use, so
reading a config (``connito --help``, the config tests) stays fast.
"""

from connito.data.config import DataConfig
from connito.data.errors import DataError

_LAZY = {"PreparedData", "prepare_data", "unigram_cross_entropy"}

__all__ = ["DataConfig", "DataError", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        from connito.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'connito.data' has no attribute '{name}'")
