"""`megatron-seed plan --check-dry-run`: the planner's memory of a layout's first and last rank against
the dry run of that layout, category by category; a wrong prediction is named with what differs."""
import dataclasses

import pytest

from megatron_seed.cli import main
from megatron_seed.config import ConfigError, load_config
from megatron_seed.plan.dry_run import dry_run
from megatron_seed.plan.executed import compare, dry_run_config, format_checks, planner_assumptions, planner_workload
from megatron_seed.plan.inputs import Assumptions, Workload
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.plan.memory import global_rank_memory

# the tiny preset, 2 prompts x 2 samples of 24 + 8 tokens in the rollout
TINY = ["--preset", "tiny", "--set", "rl.prompts_per_step=2", "--set", "rollout.samples_per_prompt=2", "--set", "rollout.max_new_tokens=8"]
STEP = ["--seq-len", "32", "--global-batch", "16", "--micro-batch", "2", "--precision", "fp32"]


@pytest.mark.timeout(300)
def test_tiny_tp2_pp2_dp2_agrees_with_its_dry_run(capsys):
    assert main(["plan", *TINY, *STEP, "--gpus", "8", "--layout", "tp=2,pp=2", "--check-dry-run"]) == 0
    out = capsys.readouterr().out
    # 16 sequences over dp=2 in micro-batches of 2 is 4 per rank; 2 keep pp=2's in-flight forwards
    assert "planner vs dry run, TP2 PP2 VPP1 EP1 ETP1 DP2 CP1, 2 micro-batches of 2 x 32 tokens" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "7 ")) and line.rstrip().endswith("agrees")]
    categories = {" ".join(r[1:-4]) for r in rows}
    assert categories == {"parameters", "gradients", "optimizer states", "activations", "optimizer step", "train peak", "KV cache"}
    assert len(rows) == 14 and "all categories agree" in out


@pytest.mark.timeout(300)
def test_a_wrong_prediction_is_named_with_what_differs():
    """The planner's activations doubled: that category, and only it, disagrees, with its explanation."""
    cfg = load_config("tiny", overrides=TINY[3::2])
    layout = PlanLayout(tp=2)
    w = Workload(seq_len=32, global_batch=4, micro_batch=2, precision="fp32")
    job = dry_run_config(cfg, layout, w)
    report = dry_run(job, 2, 1, ("train", "rollout"))
    predicted = global_rank_memory(job.model, layout, planner_workload(job, w), planner_assumptions(Assumptions()), 1)
    assert all(r.agrees for r in compare(predicted, report, 1))
    wrong = compare(dataclasses.replace(predicted, activations=2 * predicted.activations + predicted.logits), report, 1)
    assert [r.category for r in wrong if not r.agrees] == ["activations"]
    text = format_checks(wrong, layout, w)
    assert "rank 1 activations: planner" in text and "per-module activation formulas" in text and "1 of 7 disagree" in text


def test_the_check_refuses_what_the_dry_run_cannot_execute(capsys):
    with pytest.raises(ConfigError, match="--recompute selective: the dry run executes this stack"):
        dry_run_config(load_config("tiny"), PlanLayout(), Workload(seq_len=32, global_batch=2, recompute="selective"))
    assert main(["plan", *TINY, *STEP, "--gpus", "8", "--layout", "tp=2,pp=2", "--check-dry-run", "--stack", "megatron-core"]) == 2
    assert "--stack megatron-core: the dry run executes this stack; fix: --stack ours" in capsys.readouterr().err
