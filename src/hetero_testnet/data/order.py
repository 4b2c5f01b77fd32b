"""The order in which a run reads its training samples: a seeded permutation per epoch.

Sample ids are handed out by the coordinator in increasing order (`run/assignment.py`); this module
decides which stored sample an id reads. Id j of epoch e = j // N (N samples in the split) reads
stored sample `perm_e[j % N]`, where `perm_e` is a permutation of range(N) drawn from
`random.Random(f"{data_seed}/{e}")`. Why a permutation per epoch rather than a fixed offset:
each epoch visits every sample exactly once (no sample is lost or repeated within an epoch), and
two seeds see different batches from the first step on, so seeds measure data-order noise as well
as initialisation noise.

Every client computes the same permutation from the same seed: Python's `random.Random` with a
str seed and `shuffle` are stable across platforms and Python versions (CPython documents the
reproducibility of `random()` and of `shuffle` given the seed), unlike numpy's `Generator` streams,
which NumPy may change between releases. `data_seed=None` keeps the stored order (the identity).
"""

from __future__ import annotations

import random

import numpy as np


class SampleOrder:
    """Maps sample ids to stored samples for one split of `num_samples` samples; caches one epoch."""

    def __init__(self, num_samples: int, data_seed: int | None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        self.num_samples = num_samples
        self.data_seed = data_seed
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The stored-sample index of each position of `epoch` (int64, a permutation of range(N))."""
        if self._epoch != epoch or self._perm is None:
            order = list(range(self.num_samples))
            random.Random(f"{self.data_seed}/{epoch}").shuffle(order)
            self._perm, self._epoch = np.asarray(order, dtype=np.int64), epoch
        return self._perm

    def stored(self, sample_id: int) -> int:
        """The stored sample that `sample_id` reads (ids wrap into epochs)."""
        if sample_id < 0:
            raise IndexError(f"sample id must be >= 0 (got {sample_id})")
        epoch, position = divmod(sample_id, self.num_samples)
        if self.data_seed is None:
            return position
        return int(self.permutation(epoch)[position])
