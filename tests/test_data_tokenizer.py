"""Tokenizer loading/training, the chat template's masks, and the bundled corpus."""
from __future__ import annotations

import pytest

from data import build_corpus
from data.chat import ChatFormatError, ChatTemplate
from data.tokenizer import (
    BUNDLED_MODEL, END_OF_TURN, ROLE_TOKENS, TokenizerError, load_tokenizer, train_sentencepiece,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled")


def test_bundled_tokenizer_specials_and_round_trip(tok):
    assert tok.vocab_size == 2048 and BUNDLED_MODEL.stat().st_size < 1_000_000
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.end_of_turn_id == tok.token_to_id(END_OF_TURN) and tok.end_of_turn_id not in (tok.eos_id, tok.pad_id)
    for piece in ROLE_TOKENS.values():
        assert len(tok.encode(piece)) == 1
    text = "def f(x):\n    return x * 12345  # ünïcode 世界\n"
    assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback
    assert tok.token_to_id("certainly-not-a-piece") is None


def test_corpus_is_reproducible_and_blank_line_separated():
    text = build_corpus.build_corpus()
    assert text == build_corpus.CORPUS_FILE.read_text(encoding="utf-8"), "run `python -m data.build_corpus`"
    docs = build_corpus.read_documents()
    assert len(docs) == 1800 and all(d.strip() and "\n\n" not in d for d in docs)
    assert any(d.startswith("Question:") for d in docs) and any(not d.startswith("Question:") for d in docs)


def test_train_unigram_model_and_load_by_path(tmp_path):
    docs = build_corpus.read_documents()[:300]
    path = train_sentencepiece(docs, tmp_path / "uni", vocab_size=400, model_type="unigram")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 400 and tok.token_to_id("<|assistant|>") is not None
    assert tok.decode(tok.encode(docs[0])) == docs[0]


def test_bad_tokenizer_spec_names_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="bundled"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="sentencepiece"):
        load_tokenizer(tmp_path / "junk.model")


def test_chat_template_masks_only_assistant_replies_and_their_end(tok):
    chat = ChatTemplate(tok)
    out = chat.render(CONVERSATION)
    assert len(out.ids) == len(out.loss_mask) and out.ids[0] == tok.bos_id
    trained = [i for i, m in zip(out.ids, out.loss_mask) if m]
    assert tok.decode(trained) == f"The answer is 5.{END_OF_TURN}8{END_OF_TURN}"
    # Every masked-in span ends with the end-of-turn token; no role header is ever trained on.
    headers = {tok.token_to_id(t) for t in ROLE_TOKENS.values()}
    assert not any(m and i in headers for i, m in zip(out.ids, out.loss_mask))
    assert sum(1 for i, m in zip(out.ids, out.loss_mask) if m and i == tok.end_of_turn_id) == 2
    # The generation prompt is the rendering up to (and including) the next assistant header.
    prompt = chat.render_prompt(CONVERSATION[:2])
    assert prompt[-1] == tok.token_to_id(ROLE_TOKENS["assistant"])
    assert out.ids[: len(prompt)] == prompt


def test_chat_template_rejects_malformed_conversations(tok):
    chat = ChatTemplate(tok)
    with pytest.raises(ChatFormatError, match="role 'bot'"):
        chat.render([{"role": "bot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="no assistant"):
        chat.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatFormatError, match="system message may only come first"):
        chat.render([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


def test_hf_tokenizer_directory_keeps_vocabulary_and_uses_chatml(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(build_corpus.read_documents()[:200], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == len(fast)
    assert tok.encode("Question: 12 + 3") == fast.encode("Question: 12 + 3", add_special_tokens=False)
    assert tok.end_of_turn_id == fast.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_id == fast.convert_tokens_to_ids("<|endoftext|>")
    chat = ChatTemplate(tok)
    assert chat.layout == "chatml"
    out = chat.render(CONVERSATION[1:3])
    assert tok.decode([i for i, m in zip(out.ids, out.loss_mask) if m]) == "The answer is 5.<|im_end|>"


@pytest.mark.timeout(200)
def test_missing_bundled_model_is_trained_into_the_cache_identically(tmp_path, monkeypatch):
    import data.tokenizer as tokenizer_module

    monkeypatch.setenv("MEGATRON_SEED_CACHE", str(tmp_path))
    monkeypatch.setattr(tokenizer_module, "BUNDLED_MODEL", tmp_path / "absent" / "bundled.model")
    tok = load_tokenizer("bundled")
    assert (tmp_path / "bundled.model").read_bytes() == BUNDLED_MODEL.read_bytes()
    assert tok.fingerprint == load_tokenizer(BUNDLED_MODEL).fingerprint
