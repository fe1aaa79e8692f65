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
