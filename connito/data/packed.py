"""One split of packed rows held in memory, as training, evaluation and analysis read it.

:mod:`connito.data.packing` writes the rows (``input_ids`` int32, ``domain_ids`` int16 per token); a
:class:`PackedSplit` holds one split of them as int64 tensors. Shapes: N = rows in the split, T = sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PackedSplit:
    """One split of packed rows held in memory: ``input_ids_NT`` (int64) and ``domain_ids_NT`` (int64)."""

    input_ids_NT: torch.Tensor
    domain_ids_NT: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset) -> PackedSplit:
        columns = dataset.with_format("numpy")
        input_ids = np.asarray(columns["input_ids"], dtype=np.int64)
        domain_ids = np.asarray(columns["domain_ids"], dtype=np.int64)
        return cls(torch.from_numpy(input_ids), torch.from_numpy(domain_ids))

    def __len__(self) -> int:
        return self.input_ids_NT.shape[0]
