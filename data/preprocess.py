"""JSONL -> Megatron indexed dataset, tokenized in parallel worker processes.

The input is streamed: the main process reads chunks of lines, at most
``2 * workers`` chunks are in flight, workers return the chunk's tokens
concatenated with per-document lengths, and the main process appends them to
``PREFIX.bin`` in input order. Memory stays bounded by the chunks in flight, never
by the file size, and the output is identical for any number of workers.

Every document is ``tokenizer.encode(record[json_key])`` followed by EOS (unless
``append_eod=False``). A line that is not valid JSON, not an object, or lacks a
string ``json_key`` is reported with its line number, skipped and counted.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from data.indexed import IndexedDatasetBuilder, best_dtype
from data.tokenizer import Tokenizer, load_tokenizer

_worker_state: dict = {}


@dataclass
class PreprocessReport:
    documents: int = 0
    tokens: int = 0
    bad_lines: list = field(default_factory=list)  # [(line number, message)]
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.documents} documents, {self.tokens} tokens in {self.seconds:.2f} s "
            f"({self.tokens_per_second:,.0f} tokens/s); {len(self.bad_lines)} bad lines skipped"
        )


def _init_worker(tokenizer: Tokenizer, json_key: str, append_eod: bool) -> None:
    _worker_state.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod)


def encode_chunk(lines: list) -> tuple:
    """``[(line_no, raw bytes)]`` -> ``(tokens int64[], lengths, bad [(line_no, message)])``."""
    tok: Tokenizer = _worker_state["tokenizer"]
    key, eod = _worker_state["json_key"], _worker_state["append_eod"]
    texts, bad = [], []
    for line_no, raw in lines:
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append((line_no, f"invalid JSON: {e}"))
            continue
        if not isinstance(obj, dict):
            bad.append((line_no, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        text = obj.get(key)
        if not isinstance(text, str):
            what = "missing" if key not in obj else f"a {type(text).__name__}, not a string"
            bad.append((line_no, f"field '{key}' is {what}"))
            continue
        texts.append(text)
    docs = tok.encode_batch(texts)
    if eod:
        docs = [ids + [tok.eos_id] for ids in docs]
    lengths = [len(ids) for ids in docs]
    tokens = np.fromiter((t for ids in docs for t in ids), dtype=np.int64, count=sum(lengths))
    return tokens, lengths, bad


def read_chunks(path: Union[str, Path], chunk_bytes: int) -> Iterator[tuple]:
    """Yield ``(lines, nbytes)`` with ``lines = [(line_no, raw)]`` of about ``chunk_bytes``; blank lines dropped."""
    lines, size = [], 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            size += len(raw)
            if raw.strip():
                lines.append((line_no, raw))
            if size >= chunk_bytes:
                yield lines, size
                lines, size = [], 0
    if lines or size:
        yield lines, size


def preprocess_jsonl(
    input_path: Union[str, Path],
    output_prefix: Union[str, Path],
    tokenizer: Union[str, Tokenizer] = "bundled",
    json_key: str = "text",
    workers: int = 2,
    append_eod: bool = True,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    log=None,
) -> PreprocessReport:
    """Tokenize ``input_path`` into ``output_prefix.bin/.idx``; returns counts and every bad line.

    ``workers <= 1`` tokenizes in this process (same output). Bad lines are printed
    to ``log`` (default stderr) as ``INPUT:LINE: message`` as they are found.
    """
    from tqdm import tqdm

    log = log or sys.stderr
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"--input {input_path}: no such file")
    report = PreprocessReport()
    start = time.perf_counter()
    builder = IndexedDatasetBuilder(output_prefix, best_dtype(tok.vocab_size))
    bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True, desc="preprocess", disable=not progress, file=log)

    def consume(result: tuple, nbytes: int) -> None:
        tokens, lengths, bad = result
        builder.add_documents(tokens, lengths)
        report.documents += len(lengths)
        report.tokens += len(tokens)
        for line_no, message in bad:
            print(f"{input_path}:{line_no}: {message} (line skipped)", file=log)
        report.bad_lines.extend(bad)
        bar.update(nbytes)
        bar.set_postfix(docs=report.documents, bad=len(report.bad_lines), refresh=False)

    try:
        if workers <= 1:
            _init_worker(tok, json_key, append_eod)
            for lines, nbytes in read_chunks(input_path, chunk_bytes):
                consume(encode_chunk(lines), nbytes)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tok, json_key, append_eod)) as pool:
                in_flight: collections.deque = collections.deque()
                for lines, nbytes in read_chunks(input_path, chunk_bytes):
                    in_flight.append((pool.apply_async(encode_chunk, (lines,)), nbytes))
                    if len(in_flight) >= 2 * workers:  # back-pressure: never read far ahead of the writer
                        job, size = in_flight.popleft()
                        consume(job.get(), size)
                while in_flight:
                    job, size = in_flight.popleft()
                    consume(job.get(), size)
        builder.finalize()
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report


def describe(prefix: Union[str, Path], tokenizer: Optional[Tokenizer] = None, docs: int = 1) -> str:
    """A short human summary of an indexed dataset (sizes, first documents decoded)."""
    from data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    lines = [f"{prefix}: {len(ds)} documents, {ds.num_tokens} tokens, dtype {ds.dtype}"]
    for i in range(min(docs, len(ds))):
        lines.append(f"  doc {i}: {tokenizer.decode(ds[i].tolist())[:120]!r}" if tokenizer else f"  doc {i}: {ds[i][:16]}")
    return "\n".join(lines)
