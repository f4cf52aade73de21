"""Rule-based math reward: extract the final answer, check it against the reference.

Extraction (:func:`extract_final_answer`), in order of preference:
1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces respected;
2. the text after the last ``Answer:`` / ``final answer is`` marker, up to the line end;
3. the last number in the response.

Equivalence is decided by ``math-verify`` (sympy based: fractions, decimals, percent,
LaTeX, intervals, sets, ``x = 5`` vs ``5``, ``\\text{cm}`` units). Plain-word units
(``12 apples``) are stripped first. Sympy can hang on adversarial input and
math-verify's own timeout uses ``signal.alarm`` (main thread only), so every check runs
in a persistent worker process; the caller waits at most ``timeout_s`` and kills and
replaces a worker that overruns. That makes :class:`MathVerifier` safe to call from any
thread. A timeout, a parse failure or a missing answer scores 0 with the reason.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import re
import threading
from typing import Optional

from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARKER = re.compile(r"(?:final answer is|answer\s*:|answer is)\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?|-?\.\d+%?")
_WORD_UNITS = re.compile(r"^\s*(-?[\d.,/]+%?)\s*(?:[A-Za-z]+\.?(?:\^\d+)?\s*)+$")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_final_answer(response: str) -> Optional[str]:
    """The model's final answer as a string (see the module docstring), or None."""
    boxed = _last_boxed(response)
    if boxed:
        return boxed
    markers = list(_ANSWER_MARKER.finditer(response))
    if markers:
        tail = response[markers[-1].end():].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip().strip("$").rstrip(".").strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1].rstrip(",") if numbers else None


def _strip_word_units(answer: str) -> str:
    """``"12 apples"`` -> ``"12"``; anything that is not number + words is unchanged."""
    m = _WORD_UNITS.match(answer)
    return m.group(1) if m else answer


def _verify_in_this_process(reference: str, answer: str, timeout_s: int) -> tuple[bool, str]:
    """math-verify equivalence in the current (main) thread; returns (correct, reason)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold = parse(f"${reference}$", extraction_config=config, parsing_timeout=timeout_s)
    if not gold:
        gold = parse(reference, extraction_config=config, parsing_timeout=timeout_s)
    if not gold:
        return False, f"could not parse the reference {reference!r}"
    pred = parse(f"${answer}$", extraction_config=config, parsing_timeout=timeout_s)
    if not pred:
        return False, f"could not parse the answer {answer!r}"
    if verify(gold, pred, timeout_seconds=timeout_s):
        return True, "ok"
    return False, f"answer {answer!r} != reference {reference!r}"


def _worker_main(conn) -> None:
    """Worker process loop: import once, then answer (reference, answer, timeout) requests."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its failures become our reasons
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        reference, answer, timeout_s = request
        try:
            conn.send(_verify_in_this_process(reference, answer, timeout_s))
        except Exception as e:  # sympy / parser errors on garbage input: an incorrect answer, not a crash
            conn.send((False, f"verification error: {type(e).__name__}: {e}"[:300]))


class _Worker:
    """One verification process with its pipe; killed and replaced after a timeout."""

    STARTUP_TIMEOUT_S = 120.0  # spawning + importing sympy on a loaded 2-core machine

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the caller's threads and locks
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(self.STARTUP_TIMEOUT_S) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError("math verifier worker failed to start within "
                               f"{self.STARTUP_TIMEOUT_S:.0f}s; check that math-verify is installed")

    def run(self, reference: str, answer: str, timeout_s: float) -> Optional[tuple[bool, str]]:
        """The (correct, reason) answer, or None when the worker overran ``timeout_s``."""
        self.conn.send((reference, answer, max(1, int(timeout_s))))
        if self.conn.poll(timeout_s):
            return self.conn.recv()
        return None

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class MathVerifier(BaseScorer):
    """Math answer scorer: reward 1.0 if the extracted answer equals the reference, else 0.0.

    ``workers`` verification processes are started lazily and shared by all threads;
    ``timeout_s`` bounds each check (parse + compare). Call :meth:`close` (or use as a
    context manager) to stop the workers; they are daemons, so they also end with us.
    """

    def __init__(self, timeout_s: float = 5.0, workers: int = 1) -> None:
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"MathVerifier: workers must be >= 1, got {workers}")
        self.timeout_s = timeout_s
        self._idle: "queue.Queue[Optional[_Worker]]" = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)  # a slot; the process starts on first use
        self._all: list[_Worker] = []
        self._lock = threading.Lock()

    def check(self, answer: str, reference: str) -> RewardResult:
        """Compare an already extracted answer with the reference."""
        answer = _strip_word_units(answer)
        worker = self._idle.get()
        try:
            if worker is None:
                worker = _Worker()
                with self._lock:
                    self._all.append(worker)
            outcome = worker.run(reference, answer, self.timeout_s)
            if outcome is None:
                self._discard(worker)
                worker = None
                return RewardResult(0.0, False, f"verification timed out after {self.timeout_s}s")
            correct, reason = outcome
            return RewardResult(1.0 if correct else 0.0, correct, reason)
        except (EOFError, BrokenPipeError, OSError) as e:  # the worker died (e.g. out of memory)
            if worker is not None:
                self._discard(worker)
            worker = None
            return RewardResult(0.0, False, f"verification worker died: {type(e).__name__}")
        finally:
            self._idle.put(worker)

    def score(self, sample: ScoringSample) -> RewardResult:
        reference = require_field(sample, "reference", "MathVerifier")
        answer = extract_final_answer(sample.response)
        if answer is None:
            return RewardResult(0.0, False, "no final answer found (no \\boxed{}, 'Answer:' or number)")
        return self.check(answer, str(reference))

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.kill()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
