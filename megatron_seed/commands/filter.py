"""``megatron-seed filter``: keep the RL prompts a policy can still learn from.

Samples ``-n`` responses per prompt with our checkpoint (``--set train.load_dir=DIR``;
without it the config's freshly initialised model, useful only for a dry run) through
the rollout engine, scores them with the reward router of the config's ``rewards``
section (:func:`rl.rewards.factory.build_reward_router`; with ``rewards.llm_judge=policy``
the same policy is the LLM verifier's judge; prompts it cannot score are refused first),
and applies the :mod:`data.filters` rules. Writes the kept prompts (JSONL, input order)
and a JSON report with counts per domain and reason (default ``<output>.report.json``).
"""
from __future__ import annotations

import argparse

from megatron_seed.cli import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--input", required=True, help="RL prompt JSONL (data.prompts schema)")
    parser.add_argument("--output", required=True, help="where the kept prompts go (JSONL)")
    parser.add_argument("--report", default=None, help="JSON report path (default: <output>.report.json)")
    parser.add_argument("-n", "--samples", type=int, default=None, help="responses per prompt (default rollout.samples_per_prompt)")
    parser.add_argument("--easy-pass-rate", type=float, default=1.0, help="drop verifiable prompts with pass rate >= this")
    parser.add_argument("--hard-pass-rate", type=float, default=None, help="drop verifiable prompts with pass rate <= this")
    parser.add_argument("--min-score-variance", type=float, default=1e-3, help="drop non-verifiable prompts with score variance below this")
    parser.add_argument("--batch-prompts", type=int, default=16, help="prompts sampled together")


def run(args: argparse.Namespace) -> int:
    import os

    from data.filters import FilterConfig
    from data.tasks import system_prompt
    from data.prompts import load_prompts
    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.model.build import build_model_chunks
    from megatron_seed.parallel.state import ParallelState
    from megatron_seed.train.checkpoint import load_model_weights
    from megatron_seed.train.run_setup import load_run_tokenizer
    from rl.filter_prompts import engine_policy, filter_prompt_file
    from rl.rewards.factory import admit_prompts, build_reward_router
    from rl.rollout.engine import RolloutEngine

    cfg = load_config(args.preset or (None if args.config else "tiny"), args.config, args.overrides)
    if not os.path.exists(args.input):
        raise ConfigError(f"--input {args.input}: no such file")
    try:
        filter_cfg = FilterConfig(args.easy_pass_rate, args.hard_pass_rate, args.min_score_variance)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ps = ParallelState.single()
    tokenizer = load_run_tokenizer(cfg)
    chunks = build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed)
    if cfg.train.load_dir:
        load_model_weights(chunks, ps, cfg.train.load_dir)
    engine = RolloutEngine(chunks, ps, cfg.rollout, tokenizer=tokenizer, seed=cfg.train.seed)
    router = build_reward_router(cfg, judge=engine.generate_text if cfg.rewards.llm_judge == "policy" else None)
    admit_prompts(load_prompts(args.input)[0], router)
    n = args.samples or cfg.rollout.samples_per_prompt
    report, loaded = filter_prompt_file(args.input, args.output, engine_policy(engine, tokenizer, system_prompt(cfg.data.system_prompt)), router, n,
                                        filter_cfg, args.batch_prompts, args.report)
    print(report.format())
    if loaded.num_bad:
        print(loaded.summary())
    print(f"kept {report.total('kept')} of {report.total()} prompts -> {args.output}")
    return 0
