"""Which packed rows each rank reads at each step: a pure function of (seed, step, micro-step, rank).

A resumed run therefore reads exactly the rows the uninterrupted run would have read, with no loader state
to checkpoint. Rows are drawn without replacement from a fresh seeded permutation each epoch.

The rows themselves are a :class:`connito.data.packed.PackedSplit`.
"""

import numpy as np


class StepSampler:
    def __init__(self, num_rows: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if num_rows < micro_batch * world_size:
            raise ValueError(
                f"the training split has {num_rows} packed rows, fewer than one micro-batch on every rank "
                f"({micro_batch} x {world_size}). Prepare more data (data.max_chars_per_domain) or lower "
                "train.micro_batch_size / data.seq_len"
            )
        self.num_rows = num_rows
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._epoch = epoch
        return self._perm

    def rows(self, step: int, micro_step: int) -> list[int]:
        first = step * self.global_batch + (micro_step * self.world_size + self.rank) * self.micro_batch
        out = []
        for index in range(first, first + self.micro_batch):
            epoch, position = divmod(index, self.num_rows)
            out.append(int(self._permutation(epoch)[position]))
        return out
