"""Rule scorer of the ``verify`` tasks: the policy acts as the verifier, its verdict is checked against the label.

A ``verify`` record (:func:`data.tasks.verify`) carries the verifier prompt of
:mod:`data.verifier_prompt` built with ``metadata["verdict_key"]`` and a reference
answer ``YES`` or ``NO`` (whether the shown candidate answer is equivalent to the
question's reference). The response scores 1.0 when its last ``VERDICT <key>: ...``
line gives that label; no keyed line is ``no_answer``.
"""
from __future__ import annotations

from data.verifier_prompt import parse_verdict
from rl.rewards.base import BaseScorer, RewardResult, ScoringSample, require_field


class VerdictScorer(BaseScorer):
    """Reward 1.0 when the response's keyed verdict equals the record's YES/NO label."""

    def score(self, sample: ScoringSample) -> RewardResult:
        label = str(require_field(sample, "reference", "VerdictScorer")).strip().upper()
        if label not in ("YES", "NO"):
            raise ValueError(f"VerdictScorer: reference must be YES or NO, got {label!r}")
        key = sample.metadata.get("verdict_key")
        if not key:
            raise ValueError("VerdictScorer: sample metadata has no 'verdict_key' (build verify records with data.tasks.verify)")
        verdict = parse_verdict(sample.response.rsplit("</think>", 1)[-1], key)
        if verdict is None:
            return RewardResult.failed("no_answer", f"no 'VERDICT {key}: YES|NO' line")
        if verdict == (label == "YES"):
            return RewardResult(1.0, True, "ok")
        return RewardResult.failed("wrong_answer", f"verdict {'YES' if verdict else 'NO'} != label {label}")
