"""Model-based verifier (Seed-Verifier / Seed-Thinking-Verifier) with pluggable judges.

The judge sees the triplet (question, reference answer, model answer) and written
principles for deciding equivalence, and answers YES or NO. The "thinking" variant asks
it to reason step by step first and end with ``Final verdict: YES`` / ``NO``; the verdict
is the last such line (case, markdown emphasis and trailing text tolerated). Anything
else (no verdict, both, an empty reply, a failed request) scores 0 with the reason.

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
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Protocol, Sequence

from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field

PRINCIPLES = """\
1. Judge only whether the model's final answer is equivalent to the reference answer; ignore the quality of the reasoning.
2. Equivalent forms count as the same answer: fractions and decimals of equal value, algebraically equal expressions, \
reordered sets, the same quantity in a different notation or with or without units when the units are implied.
3. If the question asks for several values, every value must match; a partially correct answer is NOT equivalent.
4. A numerical approximation matches only if the question allows approximation or the reference is itself approximate.
5. If the model gives several different final answers, or hedges between candidates, it is NOT equivalent.
6. An answer that is missing, empty or unreadable is NOT equivalent.
7. For multiple choice, the chosen option (letter or its content) must be the reference option."""

_PROMPT = """\
You are a strict verifier. Decide whether a model's answer to a question is equivalent to the reference answer.

Principles:
{principles}

Question:
{question}

Reference answer:
{reference}

Model answer:
{answer}

{instruction}"""

_DIRECT = "Reply with a single word: YES if the model answer is equivalent to the reference answer, NO otherwise."
_THINKING = ("First reason step by step about whether the model answer is equivalent to the reference answer, "
             "applying the principles. Then end with a last line of the form:\nFinal verdict: YES\nor\nFinal verdict: NO")

_VERDICT_LINE = re.compile(r"final\s+verdict\s*[:：\-]?\s*[*_`\"'\[(]*\s*(yes|no|correct|incorrect)\b", re.IGNORECASE)
_BARE = re.compile(r"^[\s*_`\"'\[(]*(yes|no|correct|incorrect)\b[\s*_`\"'\])\.!]*$", re.IGNORECASE)


def build_verifier_prompt(question: str, reference: str, answer: str, thinking: bool = False,
                          principles: str = PRINCIPLES) -> str:
    """The judge prompt for one (question, reference, answer) triplet."""
    return _PROMPT.format(principles=principles, question=question.strip(), reference=reference.strip(),
                          answer=answer.strip() or "(empty)", instruction=_THINKING if thinking else _DIRECT)


def parse_verdict(reply: str, thinking: bool = False) -> Optional[bool]:
    """True (YES) / False (NO) / None (malformed).

    Thinking replies: the last ``Final verdict: X`` occurrence decides. Direct replies:
    the same marker if present, else a reply that is only YES/NO (markdown allowed).
    """
    matches = _VERDICT_LINE.findall(reply)
    if matches:
        return matches[-1].lower() in ("yes", "correct")
    if thinking:
        return None
    bare = _BARE.match(reply.strip())
    return bare.group(1).lower() in ("yes", "correct") if bare else None


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
        replies = list(self.generate(list(prompts)))
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
    """

    def __init__(self, judge: Judge, thinking: bool = True, principles: str = PRINCIPLES,
                 max_answer_chars: int = 4000) -> None:
        self.judge, self.thinking, self.principles = judge, thinking, principles
        self.max_answer_chars = max_answer_chars

    def prompt_for(self, sample: ScoringSample) -> str:
        reference = require_field(sample, "reference", "LLMVerifier")
        answer = sample.response.rsplit("</think>", 1)[-1][-self.max_answer_chars:]
        return build_verifier_prompt(sample.question or sample.prompt, str(reference), answer, self.thinking,
                                     self.principles)

    def score(self, sample: ScoringSample) -> RewardResult:
        return self.score_batch([sample])[0]

    def score_batch(self, samples: Sequence[ScoringSample]) -> list[RewardResult]:
        prompts = [self.prompt_for(s) for s in samples]
        try:
            replies = self.judge.complete(prompts)
        except JudgeError as e:
            return [RewardResult(0.0, False, f"judge failed: {e}") for _ in samples]
        results = []
        for reply in replies:
            verdict = parse_verdict(reply, self.thinking)
            if verdict is None:
                tail = reply.strip()[-80:].replace("\n", " ")
                results.append(RewardResult(0.0, False, f"malformed judge reply (no verdict): ...{tail!r}"))
            else:
                results.append(RewardResult(float(verdict), verdict, "judge: YES" if verdict else "judge: NO"))
        return results
