"""JSONL -> Megatron indexed dataset, tokenized in parallel worker processes.

The input is streamed: the main process only cuts the file into byte ranges of
about ``chunk_bytes`` ending at line boundaries (and counts their newlines, for line
numbers); workers read their range themselves, parse and tokenize it, and return the
tokens (already in the output dtype) with per-document lengths. At most
``2 * workers`` ranges are in flight and the main process appends results to
``PREFIX.bin`` in input order, so memory stays bounded by the chunks in flight, never
by the file size, and the output is identical for any number of workers.

Every document is ``tokenizer.encode(record[json_key])`` followed by EOS (unless
``append_eod=False``). A line that is not valid JSON, not an object, or lacks a
string ``json_key`` is reported with its line number, skipped and counted.
"""
from __future__ import annotations

import collections
import itertools
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


def _init_worker(tokenizer: Tokenizer, json_key: str, append_eod: bool, dtype: type) -> None:
    _worker_state.update(tokenizer=tokenizer, json_key=json_key, append_eod=append_eod, dtype=dtype)


def encode_chunk(path: str, offset: int, nbytes: int, first_line: int) -> tuple:
    """Bytes ``[offset, offset+nbytes)`` of ``path`` (whole lines) -> ``(tokens, lengths, bad [(line_no, message)])``."""
    tok: Tokenizer = _worker_state["tokenizer"]
    key, eod = _worker_state["json_key"], _worker_state["append_eod"]
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(nbytes)
    texts, bad = [], []
    for line_no, raw in enumerate(block.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
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
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=_worker_state["dtype"], count=sum(lengths))
    return tokens, lengths, bad


def byte_ranges(path: Union[str, Path], chunk_bytes: int) -> Iterator[tuple]:
    """``(offset, nbytes, first_line_no)`` of consecutive blocks of whole lines, each about ``chunk_bytes``."""
    offset, line_no, carry = 0, 1, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n") + 1  # 0 when the block holds no line end yet: read on
            if cut:
                yield offset, cut, line_no
                offset += cut
                line_no += data.count(b"\n", 0, cut)
            carry = data[cut:]
    if carry:
        yield offset, len(carry), line_no


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
    dtype = best_dtype(tok.vocab_size)
    builder = IndexedDatasetBuilder(output_prefix, dtype)
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
        init = (tok, json_key, append_eod, dtype)
        if workers <= 1:
            _init_worker(*init)
            for offset, nbytes, line_no in byte_ranges(input_path, chunk_bytes):
                consume(encode_chunk(str(input_path), offset, nbytes, line_no), nbytes)
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
                in_flight: collections.deque = collections.deque()
                for offset, nbytes, line_no in byte_ranges(input_path, chunk_bytes):
                    in_flight.append((pool.apply_async(encode_chunk, (str(input_path), offset, nbytes, line_no)), nbytes))
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
