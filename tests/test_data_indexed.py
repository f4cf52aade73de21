"""Preprocess -> indexed dataset round trip, Megatron layout, GPT samples, blending and resume."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest

from data.gpt_dataset import BlendedDataset, GPTDataset, blending_indices
from data.indexed import IndexedDataset, IndexedDatasetBuilder
from data.preprocess import preprocess_jsonl
from data.pretrain import batch_iterator, build_pretrain_dataset
from data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled")


def _write_jsonl(path, tok_texts, bad_at=()):
    """Write texts as JSONL with malformed lines inserted before the given 0-based text indices."""
    bad_lines = {}
    with open(path, "w") as f:
        line = 0
        for i, text in enumerate(tok_texts):
            if i in bad_at:
                line += 1
                f.write('{"text": "unterminated\n' if i % 2 else json.dumps({"body": text}) + "\n")
                bad_lines[line] = "invalid JSON" if i % 2 else "field 'text' is missing"
            line += 1
            f.write(json.dumps({"text": text, "meta": i}) + "\n")
    return bad_lines


def _random_dataset(path, rng, num_docs, low=0, high=1000, max_len=40):
    builder = IndexedDatasetBuilder(path, np.uint16)
    docs = [rng.integers(low, high, size=rng.integers(0, max_len)) for _ in range(num_docs)]
    for d in docs:
        builder.add_document(d)
    builder.finalize()
    return IndexedDataset(path), docs


@pytest.mark.timeout(120)
def test_preprocess_round_trip_with_bad_lines_and_any_worker_count(tmp_path, tok):
    texts = [f"Document {i}: " + "the quick brown fox " * (i % 7) + f"{i * 37}\nline two" for i in range(300)]
    texts[5] = ""  # an empty document is kept (it is just EOS)
    bad = _write_jsonl(tmp_path / "in.jsonl", texts, bad_at=(3, 4, 250))
    log = io.StringIO()
    report = preprocess_jsonl(tmp_path / "in.jsonl", tmp_path / "two", tok, workers=2, chunk_bytes=2048, progress=False, log=log)
    assert report.documents == len(texts) and [n for n, _ in report.bad_lines] == sorted(bad)
    for line_no, message in report.bad_lines:
        assert bad[line_no] in message and f"in.jsonl:{line_no}:" in log.getvalue()
    ds = IndexedDataset(tmp_path / "two")
    assert len(ds) == len(texts) and ds.dtype == np.uint16
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + [tok.eos_id]
    assert report.tokens == ds.num_tokens
    # The in-process path writes byte-identical files.
    preprocess_jsonl(tmp_path / "in.jsonl", tmp_path / "one", tok, workers=1, progress=False, log=io.StringIO())
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"two.{ext}").read_bytes()


def test_index_file_is_megatron_layout(tmp_path):
    _, docs = _random_dataset(tmp_path / "d", np.random.default_rng(0), 5)
    raw = (tmp_path / "d.idx").read_bytes()
    magic, version, code, n_seq, n_doc = struct.unpack_from("<9sQBQQ", raw)
    assert (magic, version, code, n_seq, n_doc) == (b"MMIDIDX\x00\x00", 1, 8, 5, 6)
    off = struct.calcsize("<9sQBQQ")
    lengths = np.frombuffer(raw, np.int32, 5, off)
    pointers = np.frombuffer(raw, np.int64, 5, off + 20)
    doc_idx = np.frombuffer(raw, np.int64, 6, off + 60)
    assert lengths.tolist() == [len(d) for d in docs]
    assert pointers.tolist() == (2 * np.concatenate([[0], np.cumsum(lengths[:-1])])).tolist()
    assert doc_idx.tolist() == list(range(6)) and len(raw) == off + 60 + 48
    blob = np.fromfile(tmp_path / "d.bin", np.uint16)
    assert blob.tolist() == np.concatenate(docs).tolist()


def test_reader_rejects_mismatched_pair(tmp_path):
    _random_dataset(tmp_path / "a", np.random.default_rng(0), 5)
    (tmp_path / "a.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="different runs"):
        IndexedDataset(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="megatron-seed preprocess"):
        IndexedDataset(tmp_path / "missing")


def test_gpt_samples_cut_the_shuffled_document_stream(tmp_path):
    indexed, docs = _random_dataset(tmp_path / "d", np.random.default_rng(1), 60)
    seq = 16
    ds = GPTDataset(indexed, seq, seed=7, num_samples=300)  # several epochs
    assert len(ds) >= 300
    stream = np.concatenate([docs[d] for d in ds.doc_order])
    order = np.argsort(ds.shuffle)  # position of unshuffled sample j in the shuffled order
    for j in range(len(ds)):
        sample = ds[int(order[j])]
        assert sample.dtype == np.int64 and sample.tolist() == stream[j * seq : j * seq + seq + 1].tolist()
    again = GPTDataset(indexed, seq, seed=7, num_samples=300)
    other = GPTDataset(indexed, seq, seed=8, num_samples=300)
    assert all(np.array_equal(ds[i], again[i]) for i in range(50))
    assert not all(np.array_equal(ds[i], other[i]) for i in range(50))
    # Each epoch is a permutation of all documents.
    n = len(docs)
    for e in range(len(ds.doc_order) // n):
        assert sorted(ds.doc_order[e * n : (e + 1) * n]) == list(range(n))


def test_blending_counts_track_weights_for_every_prefix():
    weights = [0.5, 0.3, 0.2]
    idx, sample_idx = blending_indices(weights, 5000)
    counts = np.zeros(3)
    for i, d in enumerate(idx):
        assert sample_idx[i] == counts[d]  # each dataset is read in order 0, 1, 2, ...
        counts[d] += 1
        assert np.all(np.abs(counts - np.array(weights) * (i + 1)) <= 1.0 + 1e-9)


def test_blended_pretrain_dataset_draws_by_weight(tmp_path, tok):
    rng = np.random.default_rng(2)
    _random_dataset(tmp_path / "low", rng, 80, 0, 100)  # ids < 100
    _random_dataset(tmp_path / "high", rng, 80, 1000, 1100)  # ids >= 1000
    ds = build_pretrain_dataset([str(tmp_path / "low"), str(tmp_path / "high")], [1, 3], 8, 5, tok, num_samples=2000)
    assert isinstance(ds, BlendedDataset) and len(ds) == 2000
    from_high = sum(int(ds[i][0] >= 1000) for i in range(2000))
    assert abs(from_high / 2000 - 0.75) < 0.01
    assert all((ds[i] < 100).all() or (ds[i] >= 1000).all() for i in range(0, 2000, 97))


def test_pretrain_dataset_rejects_foreign_token_ids(tmp_path, tok):
    _random_dataset(tmp_path / "big", np.random.default_rng(3), 10, 5000, 6000)
    with pytest.raises(ValueError, match="another tokenizer"):
        build_pretrain_dataset([str(tmp_path / "big")], None, 8, 0, tok)


def test_batch_iterator_is_exactly_resumable_across_dp_ranks(tmp_path, tok):
    ds = build_pretrain_dataset(["bundled"], None, 32, 11, tok, cache=tmp_path)
    mbs, dp = 3, 2
    full = {r: batch_iterator(ds, mbs, r, dp) for r in range(dp)}
    steps = [[next(full[r]) for _ in range(6)] for r in range(dp)]
    for r in range(dp):
        assert steps[r][0].shape == (mbs, 33) and str(steps[r][0].dtype) == "torch.int64"
        resumed = batch_iterator(ds, mbs, r, dp, consumed_samples=4 * mbs * dp)
        for k in (4, 5):
            assert next(resumed).equal(steps[r][k])
    # Ranks interleave over the global sample stream: step k of rank r is samples k*6 + r*3 .. +3.
    assert steps[1][2][0].numpy().tolist() == ds[2 * mbs * dp + mbs].tolist()
    with pytest.raises(ValueError, match="multiple of"):
        batch_iterator(ds, mbs, 0, dp, consumed_samples=5)


@pytest.mark.timeout(120)
def test_preprocess_command_reports_and_writes(tmp_path, capsys, tok):
    from megatron_seed.cli import main

    _write_jsonl(tmp_path / "in.jsonl", ["alpha beta", "gamma"], bad_at=(1,))
    code = main(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                 "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0 and "2 documents" in out and "1 bad lines skipped" in out and "in.jsonl:2: invalid JSON" in err
    assert IndexedDataset(tmp_path / "out")[1].tolist() == tok.encode("gamma") + [tok.eos_id]
