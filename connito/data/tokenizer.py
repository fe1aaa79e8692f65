"""Byte-level BPE tokenizer trained on the train split, saved as a transformers tokenizer directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _batches(ds: datasets.Dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    for start in range(0, len(ds), batch_size):
        yield ds[start : start + batch_size]["text"]


def train_tokenizer(train: datasets.Dataset, vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (no normalizer, no prefix space: decode(encode(x)) == x) and save it.

    Special tokens: ``<|endoftext|>`` (id 0; eos, bos and unk) and ``<|pad|>`` (id 1). The real vocabulary
    can be smaller than ``vocab_size`` when the text has fewer merges to learn; use ``len(tokenizer)``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batches(train), trainer=trainer, length=len(train))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def copy_tokenizer(source: str | Path, out_dir: Path):
    """Use an existing transformers tokenizer directory (e.g. a checkpoint's own) instead of training one."""
    from transformers import AutoTokenizer

    from connito.data.errors import DataError

    source = Path(source).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(
            f"data.tokenizer_path='{source}' is not a transformers tokenizer directory ({err}). Point it at a "
            "directory written by tokenizer.save_pretrained, or leave it empty to train a BPE on the corpus"
        ) from None
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"the tokenizer at data.tokenizer_path='{source}' has no eos token, which packing puts between "
            "documents. Set one (tokenizer.eos_token = ...) and save it again"
        )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
