"""Rule-based math reward: extract the final answer, check it against the reference.

All answer processing (extraction, normalisation, comparison) runs in a worker
process under a CPU-time budget, in linear time where it is ours (see
:mod:`rl.rewards.answers`):

* the final answer is the last ``\\boxed{}``, else the text after the last ``answer is``
  / ``Answer:`` marker, else a response that is only a number; none -> ``no_answer``;
* an answer that hedges (``or`` / ``,`` / ``;`` / ``\\pm`` where the reference has none)
  scores 0;
* when the reference is a number: a numeric-literal answer (integer, decimal,
  percentage, fraction: ``1/2`` matches ``0.5``) is compared exactly; an unevaluated
  one (``4821 + 377``, ``2 -3``, ``10^{3}``) scores 0; anything else (``2\\pi``) goes on;
* equivalence is decided by ``math-verify`` (sympy based: LaTeX, intervals, sets,
  ``x = 5`` vs ``5``, ``\\text{cm}`` units).

Time: sympy can hang on adversarial input, so each check gets ``timeout_s`` seconds
of the worker's *CPU* time (a profiling timer, and RLIMIT_CPU as a hard stop for C
code that ignores signals): a busy machine slows a check down but never fails it.
Workers start (spawn + import + a warm-up check) before they take work and a worker
killed after a timeout is replaced in the background, so start-up never counts
against a check. A wall-clock backstop (``backstop_s``) kills a worker that neither
answers nor uses CPU. Safe to call from any thread.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from typing import Optional, Union

from rl.rewards.answers import (MAX_ANSWER_CHARS, extract_final_answer, is_numeric_literal, is_unevaluated, normalize_answer,
                                numbers_equal)
from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field

_HEDGE_MARKS = (" or ", ",", ";", "\\pm", "±", " and ")


class _CPUBudgetExceeded(BaseException):
    """Raised by the profiling timer inside a check; a BaseException so no library's `except Exception` eats it."""


def judge_answer(response: str, reference: str) -> tuple:
    """``(category, reason)`` for ``response`` against ``reference`` (runs inside the worker)."""
    answer = extract_final_answer(response)
    if answer is None:
        return "no_answer", "no final answer found (no \\boxed{}, 'The answer is' or bare number)"
    if len(answer) > MAX_ANSWER_CHARS:
        return "wrong_answer", f"final answer longer than {MAX_ANSWER_CHARS} characters"
    answer, reference = normalize_answer(answer), normalize_answer(reference)
    numeric_reference = is_numeric_literal(reference)
    if numeric_reference and is_numeric_literal(answer):
        if numbers_equal(answer, reference):
            return "passed", "ok"
        return "wrong_answer", f"answer {answer!r} != reference {reference!r}"
    hedges = [m for m in _HEDGE_MARKS if m in answer and m not in reference]
    if hedges:
        return "wrong_answer", f"answer {answer[:60]!r} hedges between candidates ({hedges[0].strip()!r})"
    if numeric_reference and is_unevaluated(answer):
        return "wrong_answer", f"answer {answer[:60]!r} is an unevaluated expression, not the number {reference!r}"
    return _math_verify(reference, answer)


def _math_verify(reference: str, answer: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    # math-verify's own timeouts use SIGALRM wall time; ours is the worker's CPU budget
    gold = parse(f"${reference}$", extraction_config=config, parsing_timeout=None) or \
        parse(reference, extraction_config=config, parsing_timeout=None)
    if not gold:
        return "scoring_error", f"could not parse the reference {reference!r}"
    pred = parse(f"${answer}$", extraction_config=config, parsing_timeout=None)
    if not pred:
        return "wrong_answer", f"could not parse the answer {answer[:60]!r}"
    if verify(gold, pred, timeout_seconds=None):
        return "passed", "ok"
    return "wrong_answer", f"answer {answer[:60]!r} != reference {reference!r}"


def _worker_main(conn) -> None:
    """Worker loop: import and warm up, say ready, then answer (response, reference, cpu_s) requests."""
    import logging
    import resource
    import signal

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its failures become our reasons

    def on_timer(signum, frame):
        raise _CPUBudgetExceeded()

    signal.signal(signal.SIGPROF, on_timer)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # the hard stop: the worker dies, the parent replaces it
    _math_verify("1/2", "0.5")  # imports sympy and math-verify's parsers before the first timed check
    conn.send("ready")
    while True:
        try:
            response, reference, cpu_s = conn.recv()
        except EOFError:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = usage.ru_utime + usage.ru_stime
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (int(used + cpu_s) + 2, hard))
        signal.setitimer(signal.ITIMER_PROF, cpu_s)
        try:
            outcome = judge_answer(response, reference)
        except _CPUBudgetExceeded:
            outcome = ("timeout", f"verification used more than {cpu_s}s of CPU")
        except Exception as e:  # sympy / parser errors on garbage input: a wrong answer, not a crash
            outcome = ("wrong_answer", f"verification error: {type(e).__name__}: {e}"[:300])
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        conn.send(outcome)


class _Worker:
    """One verification process with its pipe."""

    STARTUP_TIMEOUT_S = 300.0  # spawning + importing sympy on a saturated machine

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the caller's threads and locks
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(self.STARTUP_TIMEOUT_S) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"math verifier worker failed to start within {self.STARTUP_TIMEOUT_S:.0f}s; "
                               "check that math-verify is installed")

    def run(self, response: str, reference: str, cpu_s: float, backstop_s: float) -> Optional[tuple]:
        """``(category, reason)``, or None when the worker gave no answer within ``backstop_s`` of wall time."""
        self.conn.send((response, reference, cpu_s))
        if self.conn.poll(backstop_s):
            return self.conn.recv()
        return None

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class MathVerifier(BaseScorer):
    """Math answer scorer: reward 1.0 if the final answer equals the reference, else 0.0 with the reason.

    ``workers`` verification processes start in the background at construction and are
    shared by all threads; ``timeout_s`` is the CPU budget of one check; ``backstop_s``
    (default ``60 + 30 * timeout_s``) the wall time after which a silent worker is
    killed. Call :meth:`close` (or use as a context manager) to stop the workers; they
    are daemons, so they also end with us.
    """

    def __init__(self, timeout_s: float = 5.0, workers: int = 1, backstop_s: Optional[float] = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"MathVerifier: workers must be >= 1, got {workers}")
        self.timeout_s = timeout_s
        self.backstop_s = backstop_s if backstop_s is not None else 60.0 + 30.0 * timeout_s
        self._idle: "queue.Queue[Union[_Worker, Exception]]" = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._start_replacement()

    def _start_replacement(self) -> None:
        """Start a worker in the background; it joins the idle queue once ready (or its start error does)."""

        def start() -> None:
            try:
                worker = _Worker()
            except Exception as e:
                self._idle.put(e)
                return
            with self._lock:
                if self._closed:
                    worker.kill()
                    return
                self._all.append(worker)
            self._idle.put(worker)

        threading.Thread(target=start, name="math-verifier-start", daemon=True).start()

    def check(self, response: str, reference: str) -> RewardResult:
        """Score a whole response against the reference (extraction included)."""
        worker = self._idle.get()
        if isinstance(worker, Exception):
            self._start_replacement()
            return RewardResult.failed("scoring_error", f"math verifier worker could not start: {type(worker).__name__}: {worker}")
        try:
            outcome = worker.run(response, reference, self.timeout_s, self.backstop_s)
        except (EOFError, BrokenPipeError, OSError):
            outcome = ("timeout", f"verification worker died (CPU limit {self.timeout_s}s or out of memory)")
            worker = self._discard(worker)
        else:
            if outcome is None:
                outcome = ("timeout", f"verification gave no answer within {self.backstop_s:.0f}s of wall time")
                worker = self._discard(worker)
        if worker is not None:
            self._idle.put(worker)
        category, reason = outcome
        if category == "passed":
            return RewardResult(1.0, True, reason)
        return RewardResult.failed(category, reason)

    def score(self, sample: ScoringSample) -> RewardResult:
        reference = require_field(sample, "reference", "MathVerifier")
        return self.check(sample.response, str(reference))

    def _discard(self, worker: _Worker) -> None:
        """Kill ``worker`` and start its replacement; returns None (the slot is refilled in the background)."""
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        self._start_replacement()
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for w in workers:
            w.kill()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
