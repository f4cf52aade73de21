"""Held-out evaluation: greedy accuracy and sampled pass@k per domain, against each task's ground truth.

The score never goes through the training reward (router, verifiers, reward model,
overlong penalty), so a policy that hacks the reward cannot raise it. A response is
correct only when

* the record has a ``reference_answer`` (math, puzzles): the text after the response's
  last ``The answer is`` (to the end of that line, one final period dropped, outer
  spaces trimmed) equals the reference exactly, character for character;
* the record has ``unit_tests`` (code): the program (the last fenced code block, else
  the whole response) run in the sandbox prints exactly each ``{"input", "output"}``
  test's expected stdout (byte for byte), and runs each ``{"assert"}`` test's code to
  completion (the sandbox's call-case driver); every test must pass.

Per domain ``d`` over its ``N_d`` prompts, with ``k = rl.eval_samples`` samples each at
the rollout temperature::

    greedy_acc_d  = (1 / N_d) sum_i correct(greedy response to prompt i)
    sampled_acc_d = (1 / (N_d k)) sum_i c_i          c_i = correct samples of prompt i
    pass@k_d      = (1 / N_d) sum_i [c_i > 0]

Deterministic given the seed: the evaluator owns its rollout engine and reseeds it
before every evaluation, so the same weights always get the same score, and the
training engine's random stream is never touched. Under data parallelism each dp rank
generates its share of the prompts and the results are gathered, so every rank returns
the same report.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_seed.config import ConfigError
from megatron_seed.parallel.state import ParallelState
from rl.experience import render_prompts, response_texts
from rl.rewards.code_reward import extract_code
from rl.rewards.sandbox import Case, Sandbox
from rl.rollout.engine import RolloutEngine, local_prompts
from rl.rollout.sampling import SamplingParams

_FINAL_ANSWER = re.compile(r"The answer is(.*)$", re.MULTILINE)


def final_answer(response: str) -> Optional[str]:
    """The text after the last ``The answer is`` to the end of its line, one final period dropped, or None."""
    matches = _FINAL_ANSWER.findall(response)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def ground_truth_correct(record, response: str, sandbox: Optional[Sandbox] = None) -> tuple:
    """``(correct, reason)`` of ``response`` to a :class:`data.prompts.PromptRecord`, by the strict rules above."""
    if record.reference_answer is not None:
        answer = final_answer(response)
        if answer is None:
            return False, "no 'The answer is' line"
        return (True, "exact") if answer == record.reference_answer else (False, f"answered {answer!r:.40}")
    if not record.unit_tests:
        raise ConfigError(f"held-out record {record.id}: has neither a reference_answer nor unit_tests, so it cannot be scored")
    if sandbox is None:
        raise ConfigError(f"held-out record {record.id}: code tasks need a sandbox; pass sandbox=Sandbox()")
    program = extract_code(response)
    cases = [Case(t.get("input", ""), test=t["assert"]) if "assert" in t else Case(t.get("input", "")) for t in record.unit_tests]
    for i, (test, run) in enumerate(zip(record.unit_tests, sandbox.run_cases(program, cases))):
        passed = run.ok and ("assert" in test or run.stdout == test["output"])
        if not passed:
            return False, f"test {i}: {run.describe() if not run.ok else 'wrong output'}"
    return True, f"{len(cases)}/{len(cases)} tests"


def exclude_prompts(records: Sequence, held_out: Sequence) -> list:
    """``records`` without those whose prompt text is also a held-out prompt (keeps the evaluation held out)."""
    seen = {r.prompt for r in held_out}
    return [r for r in records if r.prompt not in seen]


@dataclass
class EvalReport:
    """Per-domain results of one evaluation (see the module docstring for the formulas)."""

    greedy_acc: dict  # domain -> fraction
    sampled_acc: dict
    pass_at_k: dict
    k: int
    prompts: dict  # domain -> number of prompts
    examples: list = field(default_factory=list)  # (domain, prompt, greedy response, correct, reason), first per domain

    def overall(self, per_domain: dict) -> float:
        """The prompt-weighted mean of a per-domain fraction over every domain."""
        total = sum(self.prompts.values())
        return sum(per_domain[d] * n for d, n in self.prompts.items()) / max(total, 1)

    @property
    def overall_greedy_acc(self) -> float:
        return self.overall(self.greedy_acc)

    def table(self) -> dict:
        """``{domain: {"greedy", "sampled", "pass@k"}}`` plus ``"all"`` (prompt-weighted); no sampled keys when k = 0."""
        kinds = {"greedy": self.greedy_acc, **({"sampled": self.sampled_acc, f"pass@{self.k}": self.pass_at_k} if self.k else {})}
        out = {d: {name: values[d] for name, values in kinds.items()} for d in sorted(self.prompts)}
        out["all"] = {name: self.overall(values) for name, values in kinds.items()}
        return out

    def metrics(self, prefix: str = "eval") -> dict:
        """Flat floats for the metrics logger: ``eval/greedy_acc``, ``eval/pass@k``, ``eval/<domain>/greedy_acc``, ... ."""
        out = {f"{prefix}/greedy_acc": self.overall_greedy_acc}
        if self.k:
            out[f"{prefix}/sampled_acc"] = self.overall(self.sampled_acc)
            out[f"{prefix}/pass@{self.k}"] = self.overall(self.pass_at_k)
        for d in sorted(self.prompts):
            out[f"{prefix}/{d}/greedy_acc"] = self.greedy_acc[d]
            if self.k:
                out[f"{prefix}/{d}/sampled_acc"] = self.sampled_acc[d]
                out[f"{prefix}/{d}/pass@{self.k}"] = self.pass_at_k[d]
        return out


class HeldOutEvaluator:
    """Scores a policy on fixed held-out ``records`` (see the module docstring).

    ``policy``: this rank's model chunks (the evaluator builds its own
    :class:`~rl.rollout.engine.RolloutEngine` on them, so it always sees the current
    weights). ``samples``: ``k`` of pass@k (0 = greedy only). ``sampling``: how the
    ``k`` samples are drawn (the rollout's temperature / top-p / top-k).
    """

    def __init__(self, records: Sequence, policy, ps: ParallelState, rollout_cfg, tokenizer, seed: int, samples: int,
                 system: Optional[str] = None, sandbox: Optional[Sandbox] = None):
        if not records:
            raise ConfigError("held-out evaluation: no prompts; give at least one record (rl.eval_prompts >= 1)")
        if samples < 0:
            raise ConfigError(f"rl.eval_samples={samples}: must be >= 0 (0 = greedy only)")
        self.records, self.ps, self.seed, self.samples, self.system = list(records), ps, seed, samples, system
        self.tokenizer = tokenizer
        self.engine = RolloutEngine(policy, ps, rollout_cfg, tokenizer=tokenizer, seed=seed)
        self.sampling = SamplingParams.from_config(rollout_cfg)
        needs_sandbox = any(r.reference_answer is None for r in self.records)
        self.sandbox = sandbox if sandbox is not None or not needs_sandbox else Sandbox()

    def _score(self, mine: list, n: int, sampling: SamplingParams) -> list:
        """``[(record index, correct, response, reason)]`` for ``n`` responses to each of this rank's prompts."""
        records = [self.records[i] for i in mine]
        rollout = self.engine.generate(render_prompts(records, self.tokenizer, self.system), n=n, sampling=sampling)
        texts = response_texts(rollout, self.tokenizer, self.engine.stop_ids.tolist())
        out = []
        for b, text in enumerate(texts):
            i = mine[int(rollout.prompt_index_B[b])]
            correct, reason = ground_truth_correct(self.records[i], text, self.sandbox)
            out.append((i, correct, text, reason))
        return out

    def evaluate(self) -> EvalReport:
        """One evaluation of the current weights; the same report on every rank."""
        self.engine.generator.manual_seed(self.seed)
        mine = local_prompts(list(range(len(self.records))), self.ps)
        greedy = self._score(mine, 1, SamplingParams(temperature=0.0)) if mine else []
        sampled = self._score(mine, self.samples, self.sampling) if mine and self.samples else []
        if self.ps.dp_size > 1:
            parts: list = [None] * self.ps.dp_size
            dist.all_gather_object(parts, (greedy, sampled), group=self.ps.group("dp"))
            greedy = [row for g, _ in parts for row in g]
            sampled = [row for _, s in parts for row in s]
        return self._report(greedy, sampled)

    def _report(self, greedy: list, sampled: list) -> EvalReport:
        prompts: dict = {}
        for r in self.records:
            prompts[r.domain] = prompts.get(r.domain, 0) + 1
        greedy_acc = {d: 0.0 for d in prompts}
        examples, shown = [], set()
        for i, correct, text, reason in sorted(greedy, key=lambda row: row[0]):
            d = self.records[i].domain
            greedy_acc[d] += correct / prompts[d]
            if d not in shown:
                shown.add(d)
                examples.append((d, self.records[i].prompt, text, correct, reason))
        correct_per_prompt: dict = {}
        for i, correct, _, _ in sampled:
            correct_per_prompt[i] = correct_per_prompt.get(i, 0) + int(correct)
        sampled_acc = {d: 0.0 for d in prompts}
        pass_at_k = {d: 0.0 for d in prompts}
        if self.samples:
            for i, c in correct_per_prompt.items():
                d = self.records[i].domain
                sampled_acc[d] += c / (self.samples * prompts[d])
                pass_at_k[d] += (c > 0) / prompts[d]
        return EvalReport(greedy_acc, sampled_acc, pass_at_k, self.samples, prompts, examples)
