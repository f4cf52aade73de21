"""Model-based verifier (Seed-Verifier / Seed-Thinking-Verifier) with pluggable judges.

The judge gets the prompt of :mod:`data.verifier_prompt` (question, reference answer,
model answer, principles) with a fresh random key per sample and must end with
``VERDICT <key>: YES`` or ``NO``; the "thinking" variant asks it to reason first. The
key keeps the candidate's text from becoming the verdict: a verdict imitated inside
the answer has no key, and the parser accepts only the keyed line.

Before any judge call an answer is refused without a verdict when it is empty
(``no_answer``) or addresses the judge (``hack_suspect``: it mentions a verdict, the
rubric or the grader, or tells the reader to ignore instructions or to reply
YES / CORRECT). A judge that fails or replies without a keyed verdict says nothing
about the answer: the result is a masked ``judge_error``.

Judges implement :class:`Judge` (``complete(prompts) -> replies``):
:class:`OpenAIJudge` talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint
(stdlib HTTP, bounded concurrency, retries with exponential backoff, per-request
timeout); :class:`CallableJudge` wraps any ``generate(list[str]) -> list[str]``, e.g. our
own policy served by the rollout engine.
"""
from __future__ import annotations

import json
import random
import re
import secrets
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Protocol, Sequence

from data.verifier_prompt import PRINCIPLES, build_verifier_prompt, parse_verdict
from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field

# Text a genuine answer has no reason to contain: it speaks to whoever grades it.
_ADDRESSES_JUDGE = re.compile(
    r"verdict|rubric|grader|\bjudge\b|\bverifier\b|ignore\s+(?:all|the|any|previous|above|prior|your)"
    r"|(?:reply|respond|answer|output|say|print|return)\s+(?:with\s+|only\s+)?[\"'`*]*(?:yes|correct|true|equivalent)\b",
    re.IGNORECASE)


class Judge(Protocol):
    """Anything that answers a list of prompts with one reply each, in order."""

    def complete(self, prompts: list[str]) -> list[str]: ...


class JudgeError(RuntimeError):
    """The judge could not produce a reply (after its retries)."""


class CallableJudge:
    """Adapts ``generate(list[str]) -> list[str]`` (e.g. the rollout engine) to :class:`Judge`."""

    def __init__(self, generate: Callable[[list], list]) -> None:
        self.generate = generate

    def complete(self, prompts: list[str]) -> list[str]:
        try:
            replies = list(self.generate(list(prompts)))
        except Exception as e:  # the policy's generation failing says nothing about the answers
            raise JudgeError(f"CallableJudge: generate failed: {type(e).__name__}: {e}") from e
        if len(replies) != len(prompts):
            raise JudgeError(f"CallableJudge: generate returned {len(replies)} replies for {len(prompts)} prompts")
        return [str(r) for r in replies]


class OpenAIJudge:
    """Judge served by an OpenAI-compatible chat-completions endpoint.

    ``base_url`` is the API root (e.g. ``http://host:8000/v1``). Each prompt is one
    request, ``concurrency`` at a time; a request is retried ``retries`` times on
    connection errors, timeouts, 429 and 5xx, sleeping ``backoff_s * 2**attempt``
    (with jitter) in between. Other HTTP errors (bad model name, 400) fail at once.
    """

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, concurrency: int = 8,
                 retries: int = 3, timeout_s: float = 60.0, backoff_s: float = 1.0, max_tokens: int = 1024,
                 temperature: float = 0.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIJudge: base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError(f"OpenAIJudge: need concurrency >= 1, retries >= 0, timeout_s > 0 "
                             f"(got {concurrency}, {retries}, {timeout_s})")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.retries, self.timeout_s, self.backoff_s = concurrency, retries, timeout_s, backoff_s
        self.max_tokens, self.temperature = max_tokens, temperature

    def complete(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(min(self.concurrency, max(1, len(prompts)))) as pool:
            return list(pool.map(self.complete_one, prompts))

    def complete_one(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {self.url}"
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"{last}: {e.read()[:200].decode(errors='replace')}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise JudgeError(f"unexpected response shape from {self.url}: {type(e).__name__}: {e}") from e
        raise JudgeError(f"judge request failed after {self.retries + 1} attempts: {last}")


class LLMVerifier(BaseScorer):
    """Scores a response 1.0 when the judge says its final answer matches the reference.

    The model answer shown to the judge is the response after its reasoning (the part
    after ``</think>`` when present), truncated to ``max_answer_chars`` from the end.
    ``batched``: the router hands over all its samples at once (one judge call).
    """

    batched = True

    def __init__(self, judge: Judge, thinking: bool = True, principles: str = PRINCIPLES,
                 max_answer_chars: int = 4000) -> None:
        if max_answer_chars < 1:
            raise ValueError(f"LLMVerifier: max_answer_chars must be >= 1, got {max_answer_chars}")
        self.judge, self.thinking, self.principles = judge, thinking, principles
        self.max_answer_chars = max_answer_chars

    def answer_of(self, sample: ScoringSample) -> str:
        """What the judge sees of the response: the part after ``</think>``, its last ``max_answer_chars``."""
        return sample.response.rsplit("</think>", 1)[-1][-self.max_answer_chars:].strip()

    def prompt_for(self, sample: ScoringSample, key: str) -> str:
        reference = require_field(sample, "reference", "LLMVerifier")
        return build_verifier_prompt(sample.question or sample.prompt, str(reference), self.answer_of(sample), key,
                                     self.thinking, self.principles)

    def score(self, sample: ScoringSample) -> RewardResult:
        return self.score_batch([sample])[0]

    def score_batch(self, samples: Sequence[ScoringSample]) -> list[RewardResult]:
        results: list = [None] * len(samples)
        asks, prompts, keys = [], [], []
        for i, s in enumerate(samples):
            answer = self.answer_of(s)
            if not answer:
                results[i] = RewardResult.failed("no_answer", "empty answer")
                continue
            hit = _ADDRESSES_JUDGE.search(answer)
            if hit:
                results[i] = RewardResult.failed("hack_suspect", f"answer addresses the judge ({hit.group(0)!r})")
                continue
            key = secrets.token_hex(4)
            asks.append(i)
            keys.append(key)
            prompts.append(self.prompt_for(s, key))
        if not asks:
            return results
        try:
            replies = self.judge.complete(prompts)
        except JudgeError as e:
            for i in asks:
                results[i] = RewardResult.failed("judge_error", f"judge failed: {e}")
            return results
        for i, key, reply in zip(asks, keys, replies):
            verdict = parse_verdict(reply, key)
            if verdict is None:
                tail = reply.strip()[-80:].replace("\n", " ")
                results[i] = RewardResult.failed("judge_error", f"malformed judge reply (no verdict line): ...{tail!r}")
            elif verdict:
                results[i] = RewardResult(1.0, True, "judge: YES")
            else:
                results[i] = RewardResult.failed("wrong_answer", "judge: NO")
        return results
