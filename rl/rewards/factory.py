"""Build the reward router of a run from its config, and admit prompt records to it.

:func:`build_reward_router` puts behind one :class:`~rl.rewards.router.RewardRouter`:

* ``math`` (:class:`MathVerifier`), ``exact`` (:class:`ExactMatchScorer`), ``verify``
  (:class:`VerdictScorer`) and ``code`` (:class:`CodeReward` in the sandbox): always;
* ``llm`` (:class:`LLMVerifier`) when ``rewards.llm_judge`` is ``url`` (an
  OpenAI-compatible server at ``rewards.judge_url``) or ``policy`` (the caller passes
  ``judge``: a ``generate(list[str]) -> list[str]`` function, e.g. our own policy's
  ``RolloutEngine.generate_text``, wrapped in :class:`CallableJudge`);
* ``pairwise`` (:class:`PairwiseRMScorer`) when ``rewards.reward_model`` names a
  ``megatron-seed train-rm --save`` checkpoint;

with the DAPO overlong penalty of ``rl.overlong_penalty`` (ramp over the last quarter
of ``rollout.max_new_tokens``).

:func:`admit_prompts` is called where a run loads its prompts: a record whose route
has no scorer is refused then (with the config fix), not at step N; so is a code task
that a wrong program passes (:mod:`data.checkers`): the wrong programs are scored
through the run's own code scorer, so the check is the reward the policy will see.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from data.checkers import degenerate_outputs, degenerate_problem, expects
from megatron_seed.config import ConfigError
from rl.rewards.base import ScoringSample
from rl.rewards.router import RewardRouter, RouterConfig, route_of

_FIX = {
    "llm": "set rewards.llm_judge=url with rewards.judge_url=http://host:port/v1, or rewards.llm_judge=policy "
           "(our own policy judges)",
    "pairwise": "set rewards.reward_model=PATH (a `megatron-seed train-rm --save` checkpoint)",
}


def build_reward_router(cfg, judge: Optional[Callable[[list], list]] = None) -> RewardRouter:
    """The run's :class:`RewardRouter` (see the module docstring); ``judge`` only with ``rewards.llm_judge=policy``."""
    from rl.rewards.code_reward import CodeReward, CodeRewardConfig
    from rl.rewards.exact_match import ExactMatchScorer
    from rl.rewards.math_verifier import MathVerifier
    from rl.rewards.sandbox import SandboxLimits
    from rl.rewards.verdict import VerdictScorer

    w = cfg.rewards
    if (judge is not None) != (w.llm_judge == "policy"):
        raise ConfigError(f"rewards.llm_judge={w.llm_judge!r} but a judge function was {'given' if judge else 'not given'}; "
                          "fix: rewards.llm_judge=policy goes with the policy's generate function (the RL trainer passes it), "
                          "url and none with no judge function")
    limits = SandboxLimits(cpu_s=w.sandbox_cpu_s, wall_s=w.sandbox_wall_s, memory_mb=w.sandbox_memory_mb)
    scorers = {
        "math": MathVerifier(timeout_s=w.math_timeout_s, workers=w.math_workers),
        "exact": ExactMatchScorer(),
        "verify": VerdictScorer(),
        "code": CodeReward(CodeRewardConfig(mode=w.code_mode, workers=w.code_workers, limits=limits, isolation=w.isolation)),
    }
    if w.llm_judge != "none":
        from rl.rewards.llm_verifier import CallableJudge, LLMVerifier, OpenAIJudge

        backend = CallableJudge(judge) if judge is not None else OpenAIJudge(w.judge_url, w.judge_model, timeout_s=w.judge_timeout_s)
        scorers["llm"] = LLMVerifier(backend, thinking=w.judge_thinking)
    if w.reward_model is not None:
        scorers["pairwise"] = _pairwise_scorer(cfg)
    max_new = cfg.rollout.max_new_tokens
    penalised = cfg.rl.overlong_penalty > 0
    router_cfg = RouterConfig(max_length=max_new if penalised else None, overlong_penalty=cfg.rl.overlong_penalty,
                              overlong_buffer=max_new // 4 if penalised else 0, workers=w.workers, progress=False)
    return RewardRouter(scorers, router_cfg)


def _pairwise_scorer(cfg):
    from rl.rewards.pairwise_rm import ByteEncoder, PairwiseRMScorer, load_reward_model

    spec = cfg.rewards.reward_model_tokenizer or cfg.data.tokenizer
    if spec == "bytes":
        encoder = ByteEncoder()
    else:
        from data.tokenizer import load_tokenizer

        encoder = load_tokenizer(spec)
    try:
        return PairwiseRMScorer(load_reward_model(cfg.rewards.reward_model, encoder))
    except ValueError as e:
        raise ConfigError(f"rewards.reward_model: {e}") from None


def _table_program(tests: Sequence[dict], outputs: Sequence[str]) -> str:
    """A program that prints ``outputs[i]`` when its stdin is ``tests[i]``'s input."""
    table = {t.get("input", ""): out for t, out in zip(tests, outputs)}
    return f"import sys\nsys.stdout.write({json.dumps(table)}.get(sys.stdin.read(), ''))\n"


def degenerate_task(record, code_scorer) -> Optional[str]:
    """Why a wrong program passes this code record under ``code_scorer``, or None (see :mod:`data.checkers`)."""
    tests = list(record.unit_tests)
    if not tests:
        return None
    stdio = all("output" in t and "assert" not in t for t in tests)
    if stdio and record.checker is None:
        return degenerate_problem(tests, lambda out, exp, stdin: expects(out, exp))

    def passes(program: str) -> bool:
        sample = ScoringSample(response=program, tests=tests, checker=record.checker, domain="code")
        return code_scorer.score(sample).correct

    if not stdio:
        return "a wrong program (empty program) passes every test" if passes("") else None
    if not passes(_table_program(tests, [t["output"] for t in tests])):
        return "no program passes: the checker rejects the expected outputs"
    for name, outputs in degenerate_outputs(tests).items():
        if any(not expects(o, t["output"]) for o, t in zip(outputs, tests)) and passes(_table_program(tests, outputs)):
            return f"a wrong program ({name}) passes every test"
    return None


def admit_prompts(records: Sequence, router: RewardRouter) -> None:
    """Refuse (ConfigError naming the records and the fix) records whose route has no scorer, and code
    records that a wrong program passes."""
    missing: dict = {}
    for record in records:
        route = route_of(_sample_of(record), "llm" in router.scorers)
        if route not in router.scorers:
            missing.setdefault(route, []).append(record)
    if missing:
        lines = []
        for route, recs in missing.items():
            ids = ", ".join(r.id for r in recs[:5]) + (f" and {len(recs) - 5} more" if len(recs) > 5 else "")
            domains = sorted({r.domain for r in recs})
            lines.append(f"{len(recs)} prompt(s) of domain {domains} route to '{route}', which has no scorer ({ids}); "
                         f"fix: {_FIX.get(route, 'configure that scorer')}, or remove those prompts")
        raise ConfigError("; ".join(lines))
    code = [r for r in records if route_of(_sample_of(r), "llm" in router.scorers) == "code"]
    with ThreadPoolExecutor(max(1, router.config.workers)) as pool:
        problems = list(pool.map(lambda r: degenerate_task(r, router.scorers["code"]), code))
    bad = [(r, p) for r, p in zip(code, problems) if p]
    if bad:
        shown = "; ".join(f"{r.id}: {p}" for r, p in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(f"{len(bad)} code task(s) cannot tell right from wrong programs ({shown}); fix: give them "
                          "tests with distinct expected outputs and a checker that returns True only for right output "
                          "(data/checkers.py), or remove them")


def _sample_of(record) -> ScoringSample:
    return ScoringSample(response="", question=record.prompt, reference=record.reference_answer, domain=record.domain,
                         tests=list(record.unit_tests) or None, checker=record.checker)
