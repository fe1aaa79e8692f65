"""Data layer: offline multi-domain corpus, byte-level BPE tokenizer, packed rows with domain labels."""

from connito.data.config import DataConfig
from connito.data.errors import DataError
from connito.data.prepare import PreparedData, prepare_data, unigram_cross_entropy

__all__ = ["DataConfig", "DataError", "PreparedData", "prepare_data", "unigram_cross_entropy"]
