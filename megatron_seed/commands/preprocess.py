"""``megatron-seed preprocess``: JSONL -> Megatron ``.bin/.idx`` indexed dataset, in parallel, streaming."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="bundled", help="bundled | sentencepiece .model | HF tokenizer directory")
    parser.add_argument("--json-key", default="text", help="field of each record holding the text")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes (1 = in this process)")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false", help="do not end each document with EOS")
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="input megabytes per work item")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from data.preprocess import describe, preprocess_jsonl
    from data.tokenizer import load_tokenizer

    if args.workers < 1:
        print(f"megatron-seed preprocess: --workers={args.workers}: must be >= 1")
        return 2
    tok = load_tokenizer(args.tokenizer)
    report = preprocess_jsonl(
        args.input, args.output_prefix, tok, json_key=args.json_key, workers=args.workers,
        append_eod=args.append_eod, chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), progress=args.progress,
    )
    print(report.summary())
    print(describe(args.output_prefix, tok))
    return 0
