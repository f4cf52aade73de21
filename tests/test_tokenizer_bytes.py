"""The byte tokenizer (``data.tokenizer.load_tokenizer("bytes")``): specials, round trips, chat template, refusals."""
from __future__ import annotations

import pickle

import pytest

from data.chat import ChatTemplate
from data.tokenizer import END_OF_TURN, ROLE_TOKENS, TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bytes")


def test_ids_follow_the_specials_contract(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 264)
    specials = [tok.token_to_id(p) for p in (*ROLE_TOKENS.values(), END_OF_TURN)]
    assert specials == [4, 5, 6, 7] and tok.end_of_turn_id == 7
    assert tok.encode("A") == [8 + 65] and tok.token_to_id("7") == 8 + ord("7")
    assert tok.token_to_id("ab") is None and tok.token_to_id("<|nope|>") is None


def test_round_trips_any_text_and_specials_in_it(tok):
    text = "def f(x):\n\treturn x * 12345  # ünïcode 世界 🙂 <|end|><|user|> <s>\x00"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.end_of_turn_id) == 1 and tok.token_to_id("<|user|>") in ids  # a special is one id, as in sentencepiece
    assert len(tok.encode("世")) == 3  # one id per UTF-8 byte
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"  # control ids render as nothing
    assert tok.decode(tok.encode("世")[:2]) == "\ufffd"  # a sampled partial character does not raise


def test_fingerprint_is_stable_and_differs_from_bundled(tok):
    assert tok.fingerprint == load_tokenizer("bytes").fingerprint != load_tokenizer("bundled").fingerprint
    assert pickle.loads(pickle.dumps(tok)).encode("ok") == tok.encode("ok")  # worker processes receive it


def test_chat_template_uses_the_seed_layout(tok):
    chat = ChatTemplate(tok)
    rendered = chat.render([{"role": "user", "content": "1 + 2?"}, {"role": "assistant", "content": "3"}])
    assert chat.layout == "seed"
    assert rendered.ids == [tok.bos_id, 5, *tok.encode("1 + 2?"), 7, 6, *tok.encode("3"), 7]
    assert rendered.loss_mask == [0] * 10 + [1, 1]  # the reply and its end-of-turn only


def test_a_negative_id_is_refused_and_a_padded_row_decodes_as_unknown(tok):
    assert tok.decode([*tok.encode("a"), 270, *tok.encode("b")]) == "a\ufffdb"  # model.vocab_size 272 > 264
    with pytest.raises(TokenizerError, match="negative"):
        tok.decode([8, -1])
    with pytest.raises(TokenizerError, match="'bytes'"):
        load_tokenizer("byte")  # a near miss is not a tokenizer: the message lists the specs


def test_the_readme_job_runs_on_the_byte_tokenizer_and_a_too_small_vocabulary_is_refused():
    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.train.run_setup import load_run_tokenizer

    cfg = load_config("rl-tiny")
    assert cfg.data.tokenizer == "bytes" and load_run_tokenizer(cfg).vocab_size <= cfg.model.vocab_size
    with pytest.raises(ConfigError, match="model.vocab_size=256"):
        load_run_tokenizer(load_config("rl-tiny", overrides=["model.vocab_size=256"]))
