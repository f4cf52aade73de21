"""GPT pretraining samples from indexed datasets, and weighted blending of several.

:class:`GPTDataset` (Megatron's GPTDataset without the C++ helper): documents are
concatenated in a seeded order, one independent permutation per epoch, and cut into
samples of ``seq_len + 1`` tokens that cross document boundaries; sample ``i`` covers
global tokens ``[i*seq_len, i*seq_len + seq_len]`` of that stream (consecutive samples
share one token, the last target of one being the first input of the next). The
sample order is then shuffled with the same seed. Everything is a pure function of
(document lengths, seq_len, num_samples, seed), so item ``i`` is the same in every
process and after every restart: resuming at ``consumed_samples`` is exact.

:class:`BlendedDataset` (Megatron's blending): sample ``i`` goes to the dataset ``d``
whose share lags its weight the most, ``argmax_d (w_d * max(i, 1) - count_d)``, the
error-minimising assignment, so after any ``n`` samples each count is within one of
``w_d * n``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from data.indexed import IndexedDataset


class GPTDataset:
    """``ds[i]`` is an int64 array of ``seq_len + 1`` tokens; ``len(ds) >= num_samples``."""

    def __init__(self, indexed: IndexedDataset, seq_len: int, seed: int, num_samples: Optional[int] = None):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len}: must be > 0")
        self.indexed = indexed
        self.seq_len = seq_len
        lengths = indexed.sequence_lengths.astype(np.int64)
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch <= seq_len:
            raise ValueError(
                f"dataset {indexed.prefix}: {tokens_per_epoch} tokens cannot fill one sample of seq_len+1={seq_len + 1}; "
                "give it more text or lower train.seq_len"
            )
        # Enough epochs that the stream holds num_samples samples of seq_len+1 tokens.
        want = num_samples if num_samples is not None else (tokens_per_epoch - 1) // seq_len
        num_epochs = max(1, -(-(want * seq_len + 1) // tokens_per_epoch))
        rng = np.random.RandomState(seed % 2**32)
        self.doc_order = np.concatenate([rng.permutation(len(lengths)) for _ in range(num_epochs)])
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths[self.doc_order])])  # global start token of each doc
        total = (num_epochs * tokens_per_epoch - 1) // seq_len
        self.shuffle = rng.permutation(total)

    def __len__(self) -> int:
        return len(self.shuffle)

    def sample_bounds(self, index: int) -> tuple:
        """``(first doc position, offset in it)`` of unshuffled sample ``index``."""
        start = index * self.seq_len
        pos = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        return pos, start - int(self.doc_starts[pos])

    def __getitem__(self, i: int) -> np.ndarray:
        pos, offset = self.sample_bounds(int(self.shuffle[i]))
        need = self.seq_len + 1
        parts = []
        while need > 0:
            doc = int(self.doc_order[pos])
            take = min(need, int(self.indexed.sequence_lengths[doc]) - offset)
            if take > 0:
                parts.append(self.indexed.get(doc, offset, take))
                need -= take
            pos, offset = pos + 1, 0
        return np.concatenate(parts).astype(np.int64)


def blending_indices(weights: Sequence[float], num_samples: int) -> tuple:
    """Megatron's error-minimising assignment: ``(dataset_index[n], dataset_sample_index[n])``.

    Sample ``i`` goes to ``argmax_d (w_d * max(i, 1) - count_d)`` (ties: lowest d);
    ``dataset_sample_index[i]`` is how many samples ``d`` had received before.
    """
    w = np.asarray(weights, dtype=np.float64)
    dataset_index = np.empty(num_samples, dtype=np.int32)
    sample_index = np.empty(num_samples, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(num_samples):
        d = int(np.argmax(w * max(i, 1) - counts))
        dataset_index[i] = d
        sample_index[i] = counts[d]
        counts[d] += 1
    return dataset_index, sample_index


def normalize_weights(weights: Optional[Sequence[float]], count: int) -> list:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} datasets; give one weight per dataset (data.weights)")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {list(weights)}: must be >= 0 with a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


class BlendedDataset:
    """Several datasets mixed by weight; ``ds[i]`` comes from ``datasets[dataset_index[i]]``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int):
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights, len(self.datasets))
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, num_samples)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        ds = self.datasets[self.dataset_index[i]]
        return ds[int(self.dataset_sample_index[i]) % len(ds)]
