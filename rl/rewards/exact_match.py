"""Exact-string scorer for answers that are words, not quantities (the ``puzzle`` and ``verify`` tasks).

The final answer (:func:`rl.rewards.answers.extract_final_answer`) must equal the
reference token for token after case folding, with commas and whitespace as
separators (``apple, river`` = ``Apple river``) and surrounding quotes dropped. No
symbolic equivalence: ``YES or NO`` is not ``YES``, ``elppa.`` is ``elppa``.
Linear time in the response length; runs in the caller's thread.
"""
from __future__ import annotations

from rl.rewards.answers import MAX_ANSWER_CHARS, answer_tokens, extract_final_answer
from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field


class ExactMatchScorer(BaseScorer):
    """Reward 1.0 when the final answer's tokens equal the reference's, else 0.0 with the reason."""

    def score(self, sample: ScoringSample) -> RewardResult:
        reference = str(require_field(sample, "reference", "ExactMatchScorer"))
        answer = extract_final_answer(sample.response)
        if answer is None:
            return RewardResult.failed("no_answer", "no final answer found (no \\boxed{} or 'The answer is')")
        if len(answer) > MAX_ANSWER_CHARS:
            return RewardResult.failed("wrong_answer", f"final answer longer than {MAX_ANSWER_CHARS} characters")
        if answer_tokens(answer) == answer_tokens(reference):
            return RewardResult(1.0, True, "ok")
        return RewardResult.failed("wrong_answer", f"answer {answer[:60]!r} != reference {reference[:60]!r}")
