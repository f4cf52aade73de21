"""Chat template: (system, user, assistant) turns -> token ids and a loss mask.

Two layouts, chosen from the tokenizer's vocabulary:

- ``seed`` (the bundled tokenizer and any vocabulary with ``<|user|>``)::

      <s> <|system|> {system} <|end|> <|user|> {user} <|end|> <|assistant|> {reply} <|end|> ...

- ``chatml`` (vocabularies with ``<|im_start|>``/``<|im_end|>``, e.g. Qwen)::

      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n

``loss_mask[t] = 1`` exactly for the tokens of assistant replies and the end-of-turn
token that closes them: the model learns to answer and to stop, never to predict the
user. :func:`render_prompt` renders the conversation so far followed by the assistant
header, the input for generation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from data.tokenizer import END_OF_TURN, ROLE_TOKENS, Tokenizer

ROLES = tuple(ROLE_TOKENS)


class ChatFormatError(ValueError):
    """A conversation is malformed (unknown role, missing content, bad turn order)."""


@dataclass
class RenderedChat:
    ids: list
    loss_mask: list  # 1 = trained on (assistant reply + its end-of-turn token)


class ChatTemplate:
    """Renders conversations for one tokenizer; see the module docstring for the layouts."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        if all(tokenizer.token_to_id(t) is not None for t in (*ROLE_TOKENS.values(), END_OF_TURN)):
            self.layout = "seed"
            self._headers = {r: [tokenizer.token_to_id(t)] for r, t in ROLE_TOKENS.items()}
            self._end = [tokenizer.token_to_id(END_OF_TURN)]
            self._prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        elif tokenizer.token_to_id("<|im_start|>") is not None and tokenizer.token_to_id("<|im_end|>") is not None:
            self.layout = "chatml"
            start = tokenizer.token_to_id("<|im_start|>")
            self._headers = {r: [start] + tokenizer.encode(f"{r}\n") for r in ROLES}
            # The newline after <|im_end|> is template glue, not something the model must produce.
            self._end = [tokenizer.token_to_id("<|im_end|>")]
            self._glue = tokenizer.encode("\n")
            self._prefix = []
        else:
            raise ChatFormatError(
                f"tokenizer {tokenizer.name}: has neither {', '.join(ROLE_TOKENS.values())} and {END_OF_TURN} "
                "nor <|im_start|>/<|im_end|>; train it with data.tokenizer.train_sentencepiece (adds them)"
            )

    def _check(self, messages: Sequence[dict]) -> None:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatFormatError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
            if m["role"] not in ROLES:
                raise ChatFormatError(f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise ChatFormatError(f"message {i}: content must be a string")
            if m["role"] == "system" and i != 0:
                raise ChatFormatError(f"message {i}: a system message may only come first")

    def render(self, messages: Sequence[dict]) -> RenderedChat:
        """Token ids of the whole conversation and its loss mask (1 on assistant replies + end-of-turn)."""
        self._check(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatFormatError("conversation has no assistant message, so nothing would be trained on")
        ids = list(self._prefix)
        mask = [0] * len(ids)
        for m in messages:
            header = self._headers[m["role"]]
            body = self.tokenizer.encode(m["content"]) + self._end
            trained = 1 if m["role"] == "assistant" else 0
            ids += header + body
            mask += [0] * len(header) + [trained] * len(body)
            if self.layout == "chatml":
                ids += self._glue
                mask += [0] * len(self._glue)
        return RenderedChat(ids, mask)

    def render_prompt(self, messages: Sequence[dict]) -> list:
        """Ids of ``messages`` followed by the assistant header: what a policy continues from."""
        self._check(messages)
        ids = list(self._prefix)
        for m in messages:
            ids += self._headers[m["role"]] + self.tokenizer.encode(m["content"]) + self._end
            if self.layout == "chatml":
                ids += self._glue
        return ids + self._headers["assistant"]

    @property
    def stop_ids(self) -> list:
        """Ids that end an assistant reply during generation."""
        return sorted({self._end[0], self.tokenizer.eos_id})
