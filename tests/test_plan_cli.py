"""`megatron-seed plan` end to end: the 200B search, the Qwen3-235B sanity check, bad inputs."""
import json
from dataclasses import replace

import pytest
import torch

from megatron_seed.cli import main
from megatron_seed.config import load_config
from megatron_seed.model.gpt import GPTModel
from megatron_seed.params import attention_parameters, count_parameters
from megatron_seed.parallel.state import ParallelState
from megatron_seed.plan.hardware import GIB, get_gpu
from megatron_seed.plan.inputs import Assumptions, Cluster, Workload
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.plan.memory import kv_cache_bytes, rank_memory
from megatron_seed.plan.timing import stage_flops
from megatron_seed.train.metrics import flops_per_token
from rl.rollout.precision import SamplingWeights
from tests.model_utils import tiny_model

QWEN3_235B = [
    "--set", "model.vocab_size=151936", "--set", "model.hidden_size=4096", "--set", "model.num_layers=94",
    "--set", "model.num_attention_heads=64", "--set", "model.num_kv_heads=4", "--set", "model.head_dim=128",
    "--set", "model.max_seq_len=40960", "--set", "model.moe.num_experts=128", "--set", "model.moe.top_k=8",
    "--set", "model.moe.ffn_size=1536", "--set", "model.moe.num_shared_experts=0",
]
QWEN_RUN = QWEN3_235B + ["--gpu", "h100", "--gpus", "256", "--seq-len", "4096", "--global-batch", "1024", "--micro-batch", "1"]


def _json(capsys, argv: list) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(200)
def test_200b_on_256_h100_ranks_layouts_and_the_best_fits(capsys):
    assert main(["plan", "--preset", "seed-200b-a20b", "--gpu", "h100", "--gpus", "256", "--show", "5"]) == 0
    text = capsys.readouterr().out
    assert "valid layouts" in text and "fastest layouts that do not fit" in text
    assert text.count("chunk forwards in flight") >= 2  # memory breakdowns of the best layouts
    ranked = [line for line in text.splitlines() if line.strip().startswith(("1 ", "2 ", "3 ")) and "TP" in line]
    assert len(ranked) == 3
    out = _json(capsys, ["plan", "--preset", "seed-200b-a20b", "--gpu", "h100", "--gpus", "256", "--show", "5"])
    best = out["ranked"][0]
    assert best["fits"] and best["peak_bytes"] <= 79.6 * GIB  # the "80 GB" H100: 81559 MiB
    speeds = [e["time"]["tokens_per_s_per_gpu"] for e in out["ranked"]]
    assert speeds == sorted(speeds, reverse=True)
    assert all(not e["fits"] and "GiB >" in e["why_not"] for e in out["dropped"])


@pytest.mark.timeout(90)
def test_qwen3_235b_published_layout_fits_and_tp1_pp1_ep8_does_not(capsys):
    published = ["--layout", "tp=2,pp=8,vpp=4,ep=32"]
    # Megatron-core runs this layout (its fused norms, overlaps and DeepEP: --stack megatron-core)
    mcore = _json(capsys, ["plan"] + QWEN_RUN + published + ["--stack", "megatron-core"])["evaluation"]
    assert mcore["fits"], mcore["why_not"]
    assert mcore["time"]["mfu"] > 0.25  # it reports ~25% of bf16 peak; the model must not predict less
    naive = _json(capsys, ["plan"] + QWEN_RUN + ["--layout", "tp=1,pp=1,ep=8", "--stack", "megatron-core"])["evaluation"]
    assert not naive["fits"] and "needs" in naive["why_not"]
    # this stack keeps more activations (unfused norms, tp-gathered inputs): it needs full recompute there
    ours = _json(capsys, ["plan"] + QWEN_RUN + published)["evaluation"]
    assert not ours["fits"] and "activations" in ours["why_not"]
    ours_full = _json(capsys, ["plan"] + QWEN_RUN + published + ["--recompute", "full"])["evaluation"]
    assert ours_full["fits"]
    assert ours_full["time"]["mfu"] < mcore["time"]["mfu"]


@pytest.mark.parametrize("argv, needles", [
    (["--gpus", "256", "--layout", "tp=3,pp=8"], ["tp*cp*pp = 24 does not divide --gpus=256", "fix"]),
    (["--gpus", "256", "--layout", "tp=2,pp=8,dp=15"], ["uses tp*cp*dp*pp = 240 GPUs", "fix"]),
    (["--gpus", "256", "--layout", "tp=2,pp=8,ep=48"], ["num_experts=128 is not divisible by parallel.ep=48", "fix"]),
    (["--gpus", "256", "--gpu", "a100"], ["unknown GPU", "h100", "fix"]),
    (["--gpus", "256", "--layout", "tp=2,pp=8,vpp=4,ep=32", "--assume", "overlap_ep=2"], ["overlap_ep=2.0", "[0, 1]"]),
    (["--gpus", "100"], ["not a whole number of 8-GPU nodes", "fix"]),
])
def test_bad_inputs_name_the_problem_and_the_fix(capsys, argv, needles):
    assert main(["plan", "--preset", "seed-200b-a20b"] + argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_per_rank_flops_add_up_to_the_trainers_model_flops():
    m = load_config("seed-200b-a20b").model
    w = Workload(seq_len=8192, global_batch=64)
    layout = PlanLayout(tp=4, pp=8, ep=8, dp=8)
    per_micro_batch = sum(stage_flops(m, layout, w, r).total for r in range(layout.pp)) * layout.tp
    counts, attn = count_parameters(m), attention_parameters(m)
    norm_weights = counts.norms + m.num_layers * attn.qk_norm  # the trainer counts them as 2 FLOPs each; no GEMM runs them
    expected = (flops_per_token(m, w.seq_len) / 3 - 2 * norm_weights) * w.micro_batch * w.seq_len  # forward only
    assert abs(per_micro_batch - expected) / expected < 1e-9


def test_kv_cache_bytes_equal_the_allocated_cache():
    m = tiny_model()
    layout = PlanLayout(dp=2)
    w = Workload(seq_len=16, global_batch=4, rollout_batch=6, prompt_len=5, response_len=7, kv_dtype="fp32")
    model = GPTModel(m, ParallelState.single())
    cache = model.allocate_kv_cache(batch=3, capacity=12, dtype=torch.float32)
    allocated = sum(t.numel() * t.element_size() for t in [*cache.k.values(), *cache.v.values(), cache.bias_BL])
    assert kv_cache_bytes(m, layout, w, m.num_layers) == allocated


def test_rollout_weights_are_the_bytes_of_the_rollouts_copy():
    """fp32 parameters generating at bf16: the planner counts the copy the engine holds (rl/rollout/precision.py) in the
    rollout peak; at the parameters' own dtype there is no copy."""
    m = tiny_model()
    model = GPTModel(m, ParallelState.single())
    copy = SamplingWeights(model, torch.bfloat16).model
    copied = sum(p.numel() * p.element_size() for p in copy.parameters())
    layout = PlanLayout()
    bf16 = Workload(seq_len=16, global_batch=4, precision="fp32", rollout_batch=6, prompt_len=5, response_len=7, kv_dtype="bf16")
    mem = rank_memory(m, layout, bf16, Assumptions(), 0)
    assert mem.rollout_weights == copied
    assert mem.rollout_peak == mem.state + mem.kv_cache + copied
    assert rank_memory(m, layout, replace(bf16, kv_dtype="fp32"), Assumptions(), 0).rollout_weights == 0
    assert rank_memory(m, layout, replace(bf16, precision="bf16"), Assumptions(), 0).rollout_weights == 0


def test_plan_cli_counts_a_rollout_copy_only_when_the_rollout_dtype_differs(capsys):
    """`megatron-seed plan`'s --kv-dtype defaults to the parameters' dtype, as rollout.dtype=auto samples: no copy;
    fp32 parameters with --kv-dtype bf16 (rollout.dtype=bf16 on fp32 training) add one at 2 bytes a parameter."""
    argv = ["plan", "--preset", "tiny", "--gpus", "1", "--layout", "tp=1", "--rollout-batch", "8", "--prompt-len", "4",
            "--precision", "fp32", "--json"]
    memory = []
    for extra in ([], ["--kv-dtype", "bf16"]):
        assert main(argv + extra) == 0
        memory.append(json.loads(capsys.readouterr().out)["evaluation"]["memory_by_stage"][0])
    assert memory[0]["rollout_weights"] == 0
    assert memory[1]["rollout_weights"] == memory[1]["parameters"] / 2 > 0


def test_recompute_trades_activations_for_compute():
    m = load_config("seed-200b-a20b").model
    c = Cluster(get_gpu("h100"), 256)
    layout = PlanLayout(tp=4, pp=8, ep=8, dp=8)
    acts = {}
    for policy in ("none", "selective", "full"):
        w = Workload(seq_len=8192, global_batch=1024, recompute=policy)
        acts[policy] = rank_memory(m, layout, w, Assumptions(), 0).activations
    assert acts["full"] < acts["selective"] < acts["none"]
    assert acts["full"] < 0.25 * acts["none"]
    assert c.gpu.memory_bytes / GIB == pytest.approx(79.6)
