"""Megatron's indexed dataset: a flat token file ``PREFIX.bin`` plus an index ``PREFIX.idx``.

The layout is Megatron-LM's ``MMapIndexedDataset`` / megatron-core ``IndexedDataset``
(version 1), so files written here load there and the other way round.

``PREFIX.bin``: the tokens of every sequence back to back, in ``dtype``, no header.

``PREFIX.idx`` (all integers little-endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version = 1
    uint8     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    uint64    S = number of sequences
    uint64    D = number of entries of document_indices (documents + 1)
    int32[S]  sequence_lengths (tokens)
    int64[S]  sequence_pointers (byte offset of each sequence in .bin)
    int64[D]  document_indices (document k = sequences document_indices[k] .. document_indices[k+1]-1;
              starts with 0)

Writers here store one sequence per document, so sequence i is document i. Readers
memory-map both files: opening a multi-terabyte dataset costs nothing and a read
touches only the pages it needs.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


def best_dtype(vocab_size: int) -> type:
    """Megatron's choice: uint16 when every id fits below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.bin")


def index_file(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.idx")


def dataset_exists(prefix: Union[str, Path]) -> bool:
    return data_file(prefix).exists() and index_file(prefix).exists()


class IndexedDatasetBuilder:
    """Streams documents into ``PREFIX.bin``; :meth:`finalize` writes ``PREFIX.idx``.

    Both files are written under temporary names and renamed at the end (the
    ``.bin`` first), so a reader never sees a half-written dataset and concurrent
    builders of the same prefix cannot corrupt it.
    """

    def __init__(self, prefix: Union[str, Path], dtype: type = np.uint16):
        if np.dtype(dtype) not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {dtype}: not a Megatron indexed-dataset dtype; use one of {sorted(map(str, CODE_OF_DTYPE))}")
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._tmp_bin = Path(f"{data_file(prefix)}.tmp{os.getpid()}")
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list = []
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    def add_document(self, tokens: Union[np.ndarray, list]) -> None:
        array = np.asarray(tokens)
        if self._info is not None and array.size and (array.min() < self._info.min or array.max() > self._info.max):
            raise ValueError(f"token id {int(array.max())} does not fit {self.dtype}; build with a wider dtype (best_dtype(vocab_size))")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(array.size)

    def add_documents(self, tokens: np.ndarray, lengths: list) -> None:
        """Several documents at once: ``tokens`` concatenated, ``lengths`` per document."""
        offsets = np.cumsum([0, *lengths])
        if offsets[-1] != len(tokens):
            raise ValueError(f"lengths sum to {offsets[-1]} but {len(tokens)} tokens were given")
        self._bin.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.extend(int(n) for n in lengths)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        tmp_idx = Path(f"{index_file(self.prefix)}.tmp{os.getpid()}")
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(doc_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_indices.tobytes())
        os.replace(self._tmp_bin, data_file(self.prefix))
        os.replace(tmp_idx, index_file(self.prefix))


class IndexedDataset:
    """Memory-mapped reader: ``ds[i]`` is sequence i as a numpy array; ``len(ds)`` sequences."""

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = str(prefix)
        if not dataset_exists(prefix):
            raise FileNotFoundError(
                f"indexed dataset {prefix}: {data_file(prefix)} / {index_file(prefix)} not found; "
                "create it with `megatron-seed preprocess --input X.jsonl --output-prefix PREFIX`"
            )
        self._idx = np.memmap(index_file(prefix), mode="r", dtype=np.uint8)
        if self._idx.size < _HEADER.size:
            raise ValueError(f"{index_file(prefix)}: truncated index ({self._idx.size} bytes)")
        magic, version, code, num_seq, num_doc_idx = _HEADER.unpack(self._idx[: _HEADER.size].tobytes())
        if magic != MAGIC:
            raise ValueError(f"{index_file(prefix)}: not a Megatron indexed dataset (bad magic {magic!r})")
        if version != VERSION or code not in DTYPE_CODES:
            raise ValueError(f"{index_file(prefix)}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, num_seq, offset)
        offset += 4 * num_seq
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, num_seq, offset)
        offset += 8 * num_seq
        self.document_indices = np.frombuffer(self._idx, np.int64, num_doc_idx, offset)
        bin_size = data_file(prefix).stat().st_size
        expected = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_size != expected:
            raise ValueError(f"{data_file(prefix)}: {bin_size} bytes but the index describes {expected}; the pair is from different runs")
        self._bin = np.memmap(data_file(prefix), mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of sequence ``index`` (to its end when length is None)."""
        size = int(self.sequence_lengths[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"sequence {index} has {size} tokens; asked for [{offset}, {offset + length})")
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        return np.asarray(self._bin[start : start + length])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)
