"""Pack tokenized documents into fixed rows of ``seq_len`` tokens with a domain label per token.

Legend: ``N`` tokens of one split's stream, ``R`` rows, ``L`` = seq_len.
Each document is tokenized, followed by ``<|endoftext|>``; the documents of a split are shuffled
(seeded) across domains and concatenated into one stream ``ids_N``, cut into rows ``ids_RL``; the last
partial row is dropped. ``domain_ids`` holds, per token, the index of its document's domain in the
sorted domain list (the eos after a document carries that document's domain).
"""

from __future__ import annotations

import random
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerFast

from connito.data.errors import DataError


def packed_features(seq_len: int) -> datasets.Features:
    """``input_ids``: int32 x seq_len; ``domain_ids``: int16 x seq_len (fixed-size lists)."""
    return datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
            "domain_ids": datasets.Sequence(datasets.Value("int16"), length=seq_len),
        }
    )


def tokenize_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str], batch_size: int = 512) -> list[list[int]]:
    """Token ids of each text, without special tokens; special-token strings inside text stay plain text."""
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        out: list[list[int]] = []
        for start in range(0, len(texts), batch_size):
            encodings = backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)
            out.extend(e.ids for e in encodings)
        return out
    finally:
        backend.encode_special_tokens = False


def pack_split(
    split: datasets.Dataset,
    tokenizer: PreTrainedTokenizerFast,
    domains: tuple[str, ...],
    seq_len: int,
    seed: int,
    split_name: str,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Packed rows of one corpus split, and the token count (eos included) per domain."""
    domain_index = {name: i for i, name in enumerate(domains)}
    ids_per_doc = tokenize_documents(tokenizer, split.data.column("text").to_pylist())
    doc_domains = split.data.column("domain").to_pylist()
    order = list(range(len(ids_per_doc)))
    random.Random(f"{seed}/{split_name}/pack").shuffle(order)
    eos = tokenizer.eos_token_id
    lengths_D = np.array([len(ids_per_doc[i]) + 1 for i in order], dtype=np.int64)
    ids_N = np.fromiter((t for i in order for t in (*ids_per_doc[i], eos)), dtype=np.int32, count=int(lengths_D.sum()))
    dom_D = np.array([domain_index[doc_domains[i]] for i in order], dtype=np.int16)
    domain_ids_N = np.repeat(dom_D, lengths_D)
    tokens = Counter()
    for d, n in zip(dom_D.tolist(), lengths_D.tolist()):
        tokens[domains[d]] += n
    n_rows = len(ids_N) // seq_len
    if n_rows == 0:
        raise DataError(
            f"split '{split_name}' has {len(ids_N)} tokens, fewer than one row of data.seq_len="
            f"{seq_len}; add text, raise data.max_chars_per_domain (recipe) or the split's fraction "
            "(data.validation_fraction, data.test_fraction), or lower data.seq_len"
        )
    n_keep = n_rows * seq_len
    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids_N[:n_keep]), seq_len),
            "domain_ids": pa.FixedSizeListArray.from_arrays(pa.array(domain_ids_N[:n_keep]), seq_len),
        }
    )
    packed = datasets.Dataset(datasets.table.InMemoryTable(table))
    assert packed.features == packed_features(seq_len), packed.features
    return packed, dict(tokens)
