"""Tokenizers: train and load sentencepiece models, or load a Hugging Face tokenizer directory.

Every tokenizer implements :class:`Tokenizer`: ``encode(text) -> list[int]`` (no BOS/EOS
added), ``decode(ids) -> str``, ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``,
``end_of_turn_id``, ``token_to_id(piece)`` and a ``fingerprint`` that changes whenever
the vocabulary does (used to key caches of tokenized data).

:func:`load_tokenizer` accepts

- ``"bundled"``: the sentencepiece BPE model of vocabulary 2048 trained on the bundled
  corpus (``data/corpus/bundled.model``, committed, 30 KB; where it is missing it is
  trained once into the cache directory; :func:`train_bundled` rebuilds it, byte for byte);
- ``"bytes"``: :class:`ByteTokenizer`, one id per UTF-8 byte after the same special ids
  (vocabulary 264, nothing to train or load; what ByT5-style character-level models use,
  and what lets a tiny model sample every digit of an answer);
- a path to a sentencepiece ``.model`` file;
- a Hugging Face tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``),
  loaded with ``transformers`` so converted HF checkpoints keep their vocabulary.

The sentencepiece models trained here reserve ids 0..3 for ``<pad> <unk> <s> </s>``,
then the chat specials ``<|system|> <|user|> <|assistant|> <|end|>`` and a newline
piece; they use byte fallback (no input is ever unknown), identity normalisation (code
indentation and newlines survive a round trip) and split digits (arithmetic tokenizes
digit by digit).
"""
from __future__ import annotations

import abc
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterable, Optional, Union

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_SYMBOLS = (*ROLE_TOKENS.values(), END_OF_TURN)
BUNDLED_MODEL = Path(__file__).resolve().parent / "corpus" / "bundled.model"
BUNDLED_VOCAB_SIZE = 2048
# Candidate end-of-turn tokens of common HF chat vocabularies, in order of preference.
HF_END_OF_TURN = (END_OF_TURN, "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


class TokenizerError(ValueError):
    """A tokenizer spec or file is unusable; the message says what to pass instead."""


class Tokenizer(abc.ABC):
    """The one interface every part of the pipeline codes against."""

    @abc.abstractmethod
    def encode(self, text: str) -> list:
        """Token ids of ``text``; no BOS/EOS is added."""

    def encode_batch(self, texts: list) -> list:
        """``[encode(t) for t in texts]``; implementations may do it faster."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens rendered as their pieces)."""

    @abc.abstractmethod
    def token_to_id(self, piece: str) -> Optional[int]:
        """Id of a whole vocabulary entry, or None when the vocabulary lacks it."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    end_of_turn_id: int
    fingerprint: str
    name: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; picklable (worker processes receive the serialized proto)."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.name = name
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"sentencepiece model {name}: has no EOS piece; retrain it with eos_id set (train_sentencepiece does)")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        eot = self.token_to_id(END_OF_TURN)
        self.end_of_turn_id = eot if eot is not None else self.eos_id

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes(), name=str(path))

    def encode(self, text: str) -> list:
        return self._sp.encode(text)

    def encode_batch(self, texts: list) -> list:
        return self._sp.encode(texts, num_threads=1)  # one thread: parallelism comes from worker processes

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> Optional[int]:
        idx = self._sp.piece_to_id(piece)
        return idx if idx != self._sp.unk_id() or piece == self._sp.id_to_piece(idx) else None

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["name"])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes after the specials: ids 0..3 ``<pad> <unk> <s> </s>``, 4..7 the chat specials
    ``<|system|> <|user|> <|assistant|> <|end|>``, then byte ``b`` is id ``8 + b``.

    As in the sentencepiece models, a chat special written in the text encodes to its one id
    and decodes back to its piece, so ``decode(encode(text)) == text`` for every string;
    ``<pad> <s> </s>`` decode to nothing; bytes that are not valid UTF-8 (a sampled partial
    character), ``<unk>`` and ids past the vocabulary (the unused rows of a model whose
    ``vocab_size`` is padded, which an untrained policy can sample) to U+FFFD.
    """

    CONTROL = ("<pad>", "<unk>", "<s>", "</s>")
    BYTE_OFFSET = len(CONTROL) + len(SPECIAL_SYMBOLS)

    def __init__(self) -> None:
        self.name = "bytes"
        self._special_ids = {piece: i for i, piece in enumerate((*self.CONTROL, *SPECIAL_SYMBOLS))}
        self._specials = re.compile("(" + "|".join(re.escape(p) for p in SPECIAL_SYMBOLS) + ")")
        self.vocab_size = self.BYTE_OFFSET + 256
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(len(self.CONTROL))
        self.end_of_turn_id = self._special_ids[END_OF_TURN]
        self.fingerprint = hashlib.sha256(json.dumps(["bytes", *self._special_ids]).encode()).hexdigest()[:16]

    def encode(self, text: str) -> list:
        ids = []
        for i, part in enumerate(self._specials.split(text)):  # odd parts are the specials matched
            if i % 2:
                ids.append(self._special_ids[part])
            else:
                ids.extend(self.BYTE_OFFSET + b for b in part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        pieces, run = [], bytearray()
        for i in map(int, ids):
            if i < 0:
                raise TokenizerError(f"tokenizer bytes: id {i} is negative; ids are 0..{self.vocab_size - 1}")
            if self.BYTE_OFFSET <= i < self.vocab_size:
                run.append(i - self.BYTE_OFFSET)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if i == self.unk_id or i >= self.vocab_size:  # past the vocabulary: a padded model's unused rows, sampled
                pieces.append("\ufffd")
            elif i >= len(self.CONTROL):
                pieces.append(SPECIAL_SYMBOLS[i - len(self.CONTROL)])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def token_to_id(self, piece: str) -> Optional[int]:
        """A special's id, or the id of a one-byte piece (``"7"``); None otherwise."""
        if piece in self._special_ids:
            return self._special_ids[piece]
        raw = piece.encode("utf-8")
        return self.BYTE_OFFSET + raw[0] if len(raw) == 1 else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory loaded with ``transformers.AutoTokenizer``."""

    def __init__(self, path: Union[str, Path]):
        from transformers import AutoTokenizer

        self.name = str(path)
        self._tok = AutoTokenizer.from_pretrained(str(path))
        vocab = self._tok.get_vocab()
        self.vocab_size = len(self._tok)
        self.fingerprint = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
        self.bos_id = self._tok.bos_token_id
        eos = self._tok.eos_token_id
        if eos is None:
            eos = next((vocab[t] for t in HF_END_OF_TURN if t in vocab), None)
        if eos is None:
            raise TokenizerError(f"HF tokenizer {path}: defines no eos_token; set it in tokenizer_config.json")
        self.eos_id = eos
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else eos
        self.end_of_turn_id = next((vocab[t] for t in HF_END_OF_TURN if t in vocab), eos)

    def encode(self, text: str) -> list:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list) -> list:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> Optional[int]:
        return self._tok.get_vocab().get(piece)

    def __getstate__(self) -> dict:
        return {"path": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: Union[str, Path],
    vocab_size: int = BUNDLED_VOCAB_SIZE,
    model_type: str = "bpe",
    extra_symbols: Iterable[str] = (),
    num_threads: int = 2,
) -> Path:
    """Train a sentencepiece model on ``texts`` (one string per sentence/line); returns the ``.model`` path.

    ``model_type`` is ``"bpe"`` or ``"unigram"``. The chat specials and ``extra_symbols``
    become user-defined pieces that are never split.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type={model_type!r}: choose 'bpe' or 'unigram'")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=[*SPECIAL_SYMBOLS, "\n", *extra_symbols],
        num_threads=num_threads,
        minloglevel=2,
    )
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.getvalue())
    return path


def train_bundled(path: Union[str, Path] = BUNDLED_MODEL) -> Path:
    """(Re)train the bundled tokenizer on the bundled corpus; deterministic for a given corpus."""
    from data.build_corpus import read_documents

    # Whole documents as sentences keep newlines inside training examples, so "\n"-adjacent merges are learnt.
    docs = read_documents()
    prefix = str(Path(path).with_suffix(""))
    return train_sentencepiece(docs, prefix, vocab_size=BUNDLED_VOCAB_SIZE, num_threads=1)


def load_tokenizer(spec: Union[str, Path]) -> Tokenizer:
    """``"bundled"``, ``"bytes"``, a sentencepiece ``.model`` path, or a HF tokenizer directory -> :class:`Tokenizer`."""
    spec_str = str(spec)
    if spec_str == "bytes":
        return ByteTokenizer()
    if spec_str == "bundled":
        path = BUNDLED_MODEL
        if not path.exists():  # e.g. an install without package data: train once into the cache
            from data.cache import cache_dir

            path = cache_dir() / BUNDLED_MODEL.name
            if not path.exists():
                train_bundled(path)
        tok = SentencePieceTokenizer.from_file(path)
        tok.name = "bundled"
        return tok
    path = Path(spec_str).expanduser()
    if path.is_file():
        try:
            return SentencePieceTokenizer.from_file(path)
        except RuntimeError as e:
            raise TokenizerError(f"tokenizer {spec_str}: not a sentencepiece model ({e}); pass a .model file or a HF tokenizer directory") from None
    if path.is_dir():
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise TokenizerError(f"tokenizer {spec_str}: directory has no tokenizer.json / tokenizer_config.json / tokenizer.model")
        return HFTokenizer(path)
    raise TokenizerError(
        f"tokenizer {spec_str!r}: no such file or directory; use 'bundled', 'bytes', a sentencepiece .model file or a HF tokenizer directory"
    )
