"""What the trainer needs for pretraining: a dataset of fixed-length samples and a resumable batch iterator.

- :func:`build_pretrain_dataset` opens indexed datasets by prefix (``PREFIX.bin/.idx``
  from ``megatron-seed preprocess``) or ``"bundled"`` (the bundled corpus, tokenized
  on first use into the cache directory and reused afterwards), builds a
  :class:`~data.gpt_dataset.GPTDataset` per path and blends them by weight.
- :func:`batch_iterator` deals micro-batches to data-parallel ranks the way
  Megatron's pretraining sampler does: global sample ``g`` belongs to rank
  ``(g % (B * dp)) // B``. Restarting with ``consumed_samples`` (the number of
  samples every rank together has consumed; a checkpoint stores it) continues
  with exactly the batches an uninterrupted run would have produced.

The cache directory is ``$MEGATRON_SEED_CACHE`` or ``~/.cache/megatron_seed``.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from data.build_corpus import CORPUS_FILE, read_documents
from data.cache import cache_dir
from data.gpt_dataset import BlendedDataset, GPTDataset, normalize_weights
from data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype, dataset_exists
from data.tokenizer import Tokenizer

BUNDLED = "bundled"
# Megatron over-provisions each blended component by 0.5% so rounding never runs one dry.
BLEND_MARGIN = 1.005


def bundled_prefix(tokenizer: Tokenizer, cache: Optional[Union[str, Path]] = None) -> str:
    """Indexed dataset of the bundled corpus for ``tokenizer`` (each document followed by EOS); built once."""
    corpus_hash = hashlib.sha256(CORPUS_FILE.read_bytes()).hexdigest()[:12]
    prefix = cache_dir(cache) / f"bundled-{corpus_hash}-{tokenizer.fingerprint}"
    if not dataset_exists(prefix):
        builder = IndexedDatasetBuilder(prefix, best_dtype(tokenizer.vocab_size))
        for doc in read_documents():
            builder.add_document(tokenizer.encode(doc) + [tokenizer.eos_id])
        builder.finalize()
    return str(prefix)


def resolve_prefix(path: str, tokenizer: Tokenizer, cache: Optional[Union[str, Path]] = None) -> str:
    return bundled_prefix(tokenizer, cache) if path == BUNDLED else path


def build_pretrain_dataset(
    paths: Sequence[str],
    weights: Optional[Sequence[float]],
    seq_len: int,
    seed: int,
    tokenizer: Tokenizer,
    num_samples: Optional[int] = None,
    cache: Optional[Union[str, Path]] = None,
):
    """A dataset whose item ``i`` is a LongTensor-ready int64 array of ``seq_len + 1`` tokens.

    ``num_samples`` (e.g. ``steps * global_batch_size``) sizes the shuffled epochs;
    None means one pass over the data. With several paths, ``weights`` (default equal)
    set each one's share of every prefix of the sample stream.
    """
    if not paths:
        raise ValueError("data.train_data is empty; give at least one dataset prefix or 'bundled'")
    datasets = []
    for k, path in enumerate(paths):
        indexed = IndexedDataset(resolve_prefix(path, tokenizer, cache))
        # Spot check on the longest document (cheap even for huge files): ids beyond the vocabulary mean another tokenizer.
        top = int(indexed.get(int(np.argmax(indexed.sequence_lengths))).max(initial=0)) if len(indexed) else 0
        if top >= tokenizer.vocab_size:
            raise ValueError(
                f"dataset {path}: token id {top} >= tokenizer vocab_size {tokenizer.vocab_size}; "
                "it was preprocessed with another tokenizer; rerun `megatron-seed preprocess` with data.tokenizer"
            )
        datasets.append((path, indexed, seed + k))
    if len(datasets) == 1:
        _, indexed, s = datasets[0]
        return GPTDataset(indexed, seq_len, s, num_samples)
    w = normalize_weights(weights, len(datasets))
    if num_samples is None:
        num_samples = sum(max(1, (ix.num_tokens - 1) // seq_len) for _, ix, _ in datasets)
    parts = [GPTDataset(ix, seq_len, s, math.ceil(wd * num_samples * BLEND_MARGIN) + 1) for (_, ix, s), wd in zip(datasets, w)]
    return BlendedDataset(parts, w, num_samples)


def batch_iterator(
    dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0
) -> Iterator[torch.Tensor]:
    """Endless LongTensors ``[micro_batch_size, seq_len + 1]`` for one data-parallel rank.

    Each call of ``next`` advances the global stream by ``micro_batch_size * dp_size``
    samples; rank r takes slots ``[r*B, (r+1)*B)`` of every such block. Index ``g``
    reads ``dataset[g % len(dataset)]``, so the stream repeats after ``len(dataset)``
    samples instead of stopping.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size={micro_batch_size}: must be > 0")
    block = micro_batch_size * dp_size
    if consumed_samples % block:
        raise ValueError(
            f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size * dp_size = {block}; "
            "it must count whole steps of every rank"
        )
    return _batches(dataset, micro_batch_size, consumed_samples + dp_rank * micro_batch_size, block)


def _batches(dataset, micro_batch_size: int, start: int, block: int) -> Iterator[torch.Tensor]:
    n = len(dataset)
    while True:
        rows = [dataset[(start + j) % n] for j in range(micro_batch_size)]
        yield torch.from_numpy(np.stack(rows))
        start += block
