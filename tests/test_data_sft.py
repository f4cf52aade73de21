"""SFT: masks from the chat template, packing with restarting positions, length-sorted batches,
and the packing test: a packed row's per-document losses equal each document run alone."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from data.chat import ChatTemplate
from data.sft import (
    IGNORE_INDEX, PAD_DOC, SFTExample, build_sft_batches, iter_conversations, length_sorted_batches, pack_examples,
    tokenize_conversations,
)
from data.tasks import generate_sft
from data.tokenizer import load_tokenizer
from tests.numerics import assert_close_rel


def _random_examples(num, vocab, seed, lo=3, hi=20):
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = rng.randint(lo, hi)
        split = rng.randint(1, n - 1)  # prompt part untrained, reply part trained
        out.append(SFTExample([rng.randrange(vocab) for _ in range(n)], [0] * split + [1] * (n - split)))
    return out


def test_labels_follow_the_loss_mask_and_never_cross_documents():
    examples = _random_examples(40, 100, seed=0)
    batches = build_sft_batches(examples, seq_len=48, micro_batch_size=4, seed=0, pack=True)
    seen_docs = 0
    for batch in batches:
        ids, labels, pos, docs = batch["input_ids"], batch["labels"], batch["position_ids"], batch["doc_ids"]
        assert ids.shape == labels.shape == pos.shape == docs.shape and ids.shape[1] == 48
        for b in range(ids.shape[0]):
            for t in range(48):
                if docs[b, t] == PAD_DOC:
                    assert labels[b, t] == IGNORE_INDEX
                    continue
                if t == 0 or docs[b, t] != docs[b, t - 1]:
                    assert pos[b, t] == 0  # positions restart with every document
                    seen_docs += 1
                else:
                    assert pos[b, t] == pos[b, t - 1] + 1
                if labels[b, t] != IGNORE_INDEX:
                    assert docs[b, t + 1] == docs[b, t] and labels[b, t] == ids[b, t + 1]
    assert seen_docs == len(examples)  # every example lands in exactly one row


def test_packing_is_first_fit_decreasing_and_rejects_overlong():
    examples = [SFTExample([1] * n, [1] * n) for n in (7, 5, 4, 3, 1)]
    assert pack_examples(examples, 10) == [[0, 3], [1, 2, 4]]
    with pytest.raises(ValueError, match="exceed seq_len=6"):
        pack_examples(examples, 6)


def test_length_sorted_batches_group_similar_lengths_reproducibly():
    lengths = [random.Random(1).randint(1, 100) for _ in range(37)] + list(range(13))
    batches = length_sorted_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))  # batches do not interleave
    assert batches == length_sorted_batches(lengths, 8, seed=3) != length_sorted_batches(lengths, 8, seed=4)


def test_unpacked_batches_pad_to_their_longest_and_shard_over_dp():
    examples = _random_examples(30, 50, seed=2)
    per_rank = [build_sft_batches(examples, 64, 4, seed=1, pack=False, dp_rank=r, dp_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 8 batches over 2 ranks
    for batch in per_rank[0] + per_rank[1]:
        real = (batch["doc_ids"] != PAD_DOC).sum(1)
        assert batch["input_ids"].shape[1] == int(real.max())


def test_generated_conversations_train_only_on_worked_solutions():
    tok = load_tokenizer("bundled")
    convs = generate_sft(20, seed=5)
    examples = tokenize_conversations(convs, ChatTemplate(tok), max_len=512)
    for conv, ex in zip(convs, examples):
        trained = tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])
        assert trained == conv[-1]["content"] + "<|end|>"


def test_iter_conversations_skips_bad_lines(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(good) + "\n{oops\n" + json.dumps({"messages": []}) + "\n" + json.dumps(good) + "\n")
    assert list(iter_conversations(path)) == [good["messages"]] * 2
    assert ":2:" in caplog.text and ":3:" in caplog.text


@pytest.mark.timeout(120)
def test_packed_per_document_losses_equal_unpacked():
    from megatron_seed.config import ModelConfig, MoEConfig
    from megatron_seed.model.gpt import GPTModel
    from megatron_seed.parallel.state import ParallelState

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=64,
        num_dense_layers=1, dense_ffn_size=64, moe=MoEConfig(num_experts=4, top_k=2, ffn_size=32),
    )
    model = GPTModel(cfg, ParallelState.single())
    model.init_weights(1234)
    model.eval()
    examples = _random_examples(9, cfg.vocab_size, seed=4, lo=4, hi=14)
    batches = build_sft_batches(examples, seq_len=32, micro_batch_size=2, seed=0, pack=True)

    def doc_losses(batch):
        with torch.no_grad():
            logits = model(batch["input_ids"], position_ids_BS=batch["position_ids"], doc_ids_BS=batch["doc_ids"])
        nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return nll.view(batch["labels"].shape)

    packed, alone = [], []
    for batch in batches:
        nll = doc_losses(batch)
        for b in range(batch["input_ids"].shape[0]):
            docs = batch["doc_ids"][b]
            for d in docs.unique():
                if d == PAD_DOC:
                    continue
                sel = docs == d
                packed.append(nll[b][sel].sum())
                single = {k: v[b][sel][None] for k, v in batch.items()}
                single["doc_ids"] = torch.zeros_like(single["doc_ids"])
                alone.append(doc_losses(single)[0].sum())
    assert len(packed) == len(examples) and max(batch["doc_ids"].max() for batch in batches) >= 1  # really packed
    assert_close_rel(torch.stack(packed), torch.stack(alone), 1e-5, "document losses")
    # Without doc_ids the documents would see each other: the test can tell the difference.
    batch = next(b for b in batches if b["doc_ids"].max() >= 1)
    with torch.no_grad():
        leaky = model(batch["input_ids"], position_ids_BS=batch["position_ids"])
        sealed = model(batch["input_ids"], position_ids_BS=batch["position_ids"], doc_ids_BS=batch["doc_ids"])
    assert not torch.allclose(leaky, sealed, atol=1e-4)
