"""Preprocessing throughput: ``megatron-seed preprocess`` with N workers vs plain tokenization in one process.

Both sides do the same work on the same JSONL file: parse every line and tokenize its
text with the bundled tokenizer. The reference is the simplest loop a user would
write (``json.loads`` + ``tokenizer.encode`` per line, tokens kept as Python lists,
nothing written); the pipeline additionally streams, reports bad lines and writes
the ``.bin/.idx`` files. Printed: wall-clock tokens/s of each and the ratio pipeline /
reference, plus the CPU seconds each side burnt (the pipeline's include its worker
processes), which tells the pipeline's overhead apart from contention for the cores.

    .venv/bin/python benchmarks/bench_preprocess.py --docs 60000 --workers 2
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.build_corpus import read_documents  # noqa: E402
from data.preprocess import preprocess_jsonl  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402


def write_input(path: Path, num_docs: int) -> int:
    """``num_docs`` JSONL records cycling over the bundled corpus documents; returns bytes written."""
    docs = read_documents()
    with open(path, "w") as f:
        for i in range(num_docs):
            f.write(json.dumps({"id": i, "text": docs[i % len(docs)]}) + "\n")
    return path.stat().st_size


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def reference(path: Path, tokenizer) -> tuple:
    """Single process, no pipeline: parse and tokenize every line. ``(tokens, wall s, cpu s)``."""
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    with open(path) as f:
        for line in f:
            tokens += len(tokenizer.encode(json.loads(line)["text"])) + 1  # + EOS, as the pipeline appends
    return tokens, time.perf_counter() - start, cpu_seconds() - cpu


def pipeline(path: Path, out: Path, tokenizer, workers: int) -> tuple:
    cpu = cpu_seconds()
    report = preprocess_jsonl(path, out, tokenizer, workers=workers, progress=False, log=io.StringIO())
    return report.tokens, report.seconds, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=60000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    args = parser.parse_args()
    tok = load_tokenizer("bundled")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.jsonl"
        size = write_input(path, args.docs)
        print(f"input: {args.docs} documents, {size / 1e6:.1f} MB; {os.cpu_count()} CPUs visible; workers={args.workers}")
        ref = min((reference(path, tok) for _ in range(args.repeats)), key=lambda r: r[1])
        best = min((pipeline(path, Path(tmp) / "out", tok, args.workers) for _ in range(args.repeats)), key=lambda r: r[1])
    assert best[0] == ref[0], (best[0], ref[0])
    ref_tps, ours_tps = ref[0] / ref[1], best[0] / best[1]
    print(f"reference (1 process, json + encode per line): {ref[0]:,} tokens in {ref[1]:.2f} s = {ref_tps:,.0f} tokens/s "
          f"({ref[2]:.2f} CPU s)")
    print(f"pipeline ({args.workers} workers, streaming, writes .bin/.idx): {best[0]:,} tokens in {best[1]:.2f} s "
          f"= {ours_tps:,.0f} tokens/s ({best[2]:.2f} CPU s)")
    print(f"ratio pipeline / reference: {ours_tps / ref_tps:.2f}x tokens/s, {best[2] / ref[2]:.2f}x CPU seconds")

if __name__ == "__main__":
    main()
