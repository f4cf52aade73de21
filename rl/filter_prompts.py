"""Prompt filtering by sampling: N responses per prompt from a policy, scored, then the
:mod:`data.filters` rules (too easy / too hard / low variance) decide what to keep.

Streaming: prompts are read from JSONL one batch at a time (bad lines are reported and
skipped by :func:`data.prompts.iter_prompt_records`), sampled, scored and written out,
so a file of any size runs in bounded memory. The policy is any callable
``policy(records, n) -> [[response text] * n per record]``; :func:`engine_policy` makes
one from a :class:`rl.rollout.engine.RolloutEngine` on our checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from data.filters import FilterConfig, FilterReport, PromptScores, decide
from data.prompts import LoadReport, PromptRecord, iter_prompt_records
from rl.experience import render_prompts, response_texts, scoring_sample

Policy = Callable[[Sequence[PromptRecord], int], list]


def _batches(records: Iterator[PromptRecord], size: int) -> Iterator[list]:
    batch: list = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_prompts(records: Sequence[PromptRecord], policy: Policy, router, n: int) -> list:
    """``n`` sampled responses per record, scored by ``router``: one :class:`PromptScores` per record.

    Verifiable records carry the verifier's ``correct`` flags (pass rate); the others
    only their rewards (score variance).
    """
    responses = policy(records, n)
    if len(responses) != len(records) or any(len(r) != n for r in responses):
        raise ValueError(f"policy returned {[len(r) for r in responses]} responses for {len(records)} prompts; "
                         f"it must return {n} responses for every prompt")
    samples = [scoring_sample(rec, text) for rec, texts in zip(records, responses) for text in texts]
    results = router.score_batch(samples)
    out = []
    for i, rec in enumerate(records):
        mine = results[i * n:(i + 1) * n]
        correct = [r.correct for r in mine] if rec.verifiable else None
        out.append(PromptScores(rec.id, rec.domain, rec.verifiable, [r.reward for r in mine], correct))
    return out


def filter_prompt_file(
    input_path: Union[str, Path],
    output_path: Union[str, Path],
    policy: Policy,
    router,
    n: int,
    cfg: Optional[FilterConfig] = None,
    batch_prompts: int = 16,
    report_path: Optional[Union[str, Path]] = None,
) -> tuple:
    """Filter ``input_path`` into ``output_path`` (kept records, input order); returns ``(report, load_report)``.

    The JSON report (``report_path``, default ``<output>.report.json``) holds the counts
    per domain and reason, the totals, the bad input lines and, per prompt, the decision
    with its pass rate and score variance.
    """
    if n < 1 or batch_prompts < 1:
        raise ValueError(f"n={n} samples per prompt and batch_prompts={batch_prompts} must both be >= 1")
    cfg = cfg or FilterConfig()
    report, loaded = FilterReport(), LoadReport()
    decisions = []
    with open(output_path, "w", encoding="utf-8") as out:
        for batch in _batches(iter_prompt_records(input_path, loaded), batch_prompts):
            for record, scores in zip(batch, score_prompts(batch, policy, router, n)):
                decision = decide(scores, cfg)
                report.add(decision)
                decisions.append({"id": decision.prompt_id, "domain": decision.domain, "reason": decision.reason,
                                  "pass_rate": decision.pass_rate, "score_variance": decision.score_variance})
                if decision.keep:
                    out.write(record.to_json() + "\n")
    summary = json.loads(report.to_json())
    summary["bad_records"] = [str(b) for b in loaded.bad]
    summary["samples_per_prompt"] = n
    summary["prompts"] = decisions
    report_path = report_path or f"{output_path}.report.json"
    Path(report_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return report, loaded


def engine_policy(engine, tokenizer, system: Optional[str] = None) -> Policy:
    """A :data:`Policy` sampling with a :class:`rl.rollout.engine.RolloutEngine` through the chat template."""

    def policy(records: Sequence[PromptRecord], n: int) -> list:
        texts = response_texts(engine.generate(render_prompts(records, tokenizer, system), n=n), tokenizer, engine.stop_ids.tolist())
        return [texts[i * n:(i + 1) * n] for i in range(len(records))]

    return policy
