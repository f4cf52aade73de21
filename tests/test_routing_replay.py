"""Routing replay (R3, rl.routing_replay=rollout): the rollout records every token's experts per MoE layer, and the
actor's training forwards route by them through padding, early stops, packing and micro-batches (one process), and
under pp=2, pp=2 x virtual_pp=2, ep=2 (packed, dp-balanced), tp=2 + sequence parallel and cp=2 exactly as one process does; the router's gradient
at replayed indices is the formula's; routes that do not fit are refused, and replay on a dense model at config load."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_seed.config import ConfigError, MoEConfig, ParallelConfig, RLConfig, RolloutConfig, load_config
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from moe.router import Router
from rl.experience import dp_shard, from_rollout
from rl.ppo import PPOTrainer
from rl.rollout.engine import RolloutEngine
from rl.rollout.sampling import SamplingParams
from tests.model_utils import tiny_config, tiny_model
from tests.numerics import assert_close_rel
from tests.rollout_utils import PROMPTS
from tests.test_rl_ppo import build

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0)  # the same rollouts on every dp rank and layout
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def replay_config(parallel: dict, replay: str = "rollout", max_tokens=None, num_layers: int = 2):
    cfg = tiny_config(tiny_model(num_layers=num_layers), micro_batch_size=2, adam_eps=1e-4, max_tokens_per_micro_batch=max_tokens)
    cfg.parallel = dataclasses.replace(ParallelConfig(), **parallel)
    cfg.rl = dataclasses.replace(RLConfig(), ppo_epochs=1, mini_batches=2, actor_lr=1e-2, critic_lr=1e-2, kl_coef=0.0,
                                 routing_replay=replay)
    return cfg


@torch.no_grad()
def perturb_routers(ppo: PPOTrainer) -> None:
    """Move every actor router after the rollout, so its own top-k differs from the recorded one on many tokens
    (the same change on every rank and layout: the router weight is replicated)."""
    for chunk in ppo.actor.chunks:
        for layer_id, block in chunk.layers.items():
            if block.is_moe:
                g = torch.Generator().manual_seed(100 + int(layer_id))
                weight = block.mlp.router.weight
                weight += 0.5 * torch.randn(weight.shape, generator=g).to(weight.dtype)


def rollout_and_batch(ppo: PPOTrainer, ps: ParallelState, sampler: PPOTrainer = None) -> tuple:
    """Every rank generates all prompts greedily (with ``sampler``'s actor, default ``ppo``'s) and takes its dp
    share; the token the first row emits third is a stop token, so that row (and any other emitting it) stops early."""
    sampler = sampler or ppo

    def generate(stop_ids: list):
        engine = RolloutEngine(sampler.actor.chunks, sampler.ps, RolloutConfig(), stop_ids=stop_ids, pad_id=0, seed=5)
        return engine.generate(PROMPTS, n=2, sampling=GREEDY, max_new_tokens=MAX_NEW)

    rollout = generate([generate([]).responses()[0][2]])
    exp = from_rollout(rollout, REWARDS, [r > 0 for r in REWARDS])
    return rollout, dp_shard(exp, ps.dp_rank, ps.dp_size, ppo.cfg.mini_batches)


def replay_step(rank: int, world: int, parallel: dict, replay: str = "rollout", max_tokens=None, num_layers: int = 2) -> dict:
    cfg = replay_config(parallel, replay, max_tokens, num_layers)
    ps = ParallelState.build(cfg.parallel, world, rank) if world > 1 else ParallelState.single()
    ppo = build(cfg, ps)
    # generation runs one model chunk per rank: under virtual stages a one-process twin (the same weights) samples
    twin = build(replay_config({}, replay, max_tokens, num_layers), ParallelState.single()) if cfg.parallel.virtual_pp > 1 else None
    rollout, local = rollout_and_batch(ppo, ps, twin)
    perturb_routers(ppo)
    metrics = ppo.step(local)
    first = {k: ppo.updates[0]["actor"][k] for k in ("loss", "grad_norm")}
    return {"routes": rollout.routes_BSLA.cpu(), "finish": rollout.finish_reasons, "metrics": metrics, "first": first}


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()  # set up before the function-scoped one_thread fixture: one thread here too
    torch.set_num_threads(1)
    yield {packed: replay_step(0, 1, {}, max_tokens=32 if packed else None) for packed in (False, True)}
    torch.set_num_threads(threads)


class RouteCheck:
    """Forward hooks on the actor's MoE layers: wherever a token has a recorded route the layer used exactly it, and
    every padding position arrives with no route (0) however the batch was padded or packed."""

    def __init__(self, ppo: PPOTrainer):
        self.replayed = self.padding = 0
        self.handles = [layer.register_forward_hook(self.check) for c in ppo.actor.chunks for layer in c.moe_layers()]

    def check(self, layer, args, output) -> None:
        _, valid_BS, routes_BSA, _ = args
        if routes_BSA is None:
            return
        used_BSA = layer.last_routes_BSA
        has_route_BS = (routes_BSA > 0).all(dim=-1)
        assert torch.equal(used_BSA[has_route_BS], routes_BSA[has_route_BS].long() - 1)
        assert not routes_BSA[~valid_BS.bool()].any(), "a padding position carries a route"
        self.replayed += int(has_route_BS.sum())
        self.padding += int((~valid_BS.bool()).sum())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_tokens", [None, 32], ids=["padded", "packed"])
def test_training_routes_equal_the_rollouts_through_padding_early_stops_and_packing(max_tokens):
    cfg = replay_config({}, max_tokens=max_tokens)
    ppo = build(cfg, ParallelState.single())
    rollout, batch = rollout_and_batch(ppo, ParallelState.single())
    assert "stop" in rollout.finish_reasons and "length" in rollout.finish_reasons  # early-stopped rows and full ones
    assert rollout.routes_BSLA.dtype == torch.int8 and rollout.routes_BSLA.shape[2:] == (2, 2)
    # recorded exactly for the tokens the policy was fed: every real token but each row's last one
    fed_BS = rollout.attention_mask_BS.clone()
    fed_BS[torch.arange(len(fed_BS)), rollout.prompt_width + rollout.response_lengths_B - 1] = False
    assert torch.equal((rollout.routes_BSLA > 0).all(dim=-1).all(dim=-1), fed_BS)
    perturb_routers(ppo)
    check = RouteCheck(ppo)
    metrics = ppo.step(batch)
    # the router alone now picks other experts for many tokens; replay kept the recorded ones in every forward
    assert metrics["mismatch/route_diff_mean"] > 0.2
    passes = 1 + cfg.rl.ppo_epochs  # the measuring forward, then each epoch's updates: every fed token in each, 2 MoE layers
    assert check.replayed == passes * int(fed_BS.sum()) * 2
    assert check.padding > 0


@pytest.mark.timeout(120)
def test_without_replay_the_perturbed_router_changes_the_log_probs_more(single):
    off = replay_step(0, 1, {}, replay="off")
    assert off["metrics"]["mismatch/route_diff_mean"] == pytest.approx(single[False]["metrics"]["mismatch/route_diff_mean"])
    assert off["metrics"]["mismatch/logp_abs_diff_mean"] > 1.5 * single[False]["metrics"]["mismatch/logp_abs_diff_mean"] > 0


def replay_worker(rank: int, world: int, parallel: dict, max_tokens, num_layers: int = 2) -> dict:
    return replay_step(rank, world, parallel, max_tokens=max_tokens, num_layers=num_layers)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallel,max_tokens", [({"pp": 2}, None), ({"ep": 2}, 32), ({"tp": 2, "sequence_parallel": True}, None),
                                                 ({"cp": 2}, None)], ids=["pp2", "ep2-packed-dp2", "tp2-sp", "cp2"])
def test_replay_under_a_layout_equals_one_process(single, parallel, max_tokens):
    ref = single[max_tokens is not None]
    results = run_distributed(replay_worker, 2, parallel, max_tokens)
    for rank, out in enumerate(results):
        assert out["finish"] == ref["finish"]
        assert torch.equal(out["routes"], ref["routes"])  # recorded whole on every rank: tp / cp gathered, pp stages merged
        assert out["metrics"]["mismatch/route_diff_mean"] == ref["metrics"]["mismatch/route_diff_mean"]  # counts reduced to every rank
        if rank == 1:  # log-probs live on the last pipeline stage (the logging rank)
            # differences of log-probs of size ~log(64): fp32 rounding of those, not of the ~1e-3 difference, sets the tolerance
            for key in ("mismatch/logp_abs_diff_mean", "mismatch/seq_log_ratio_abs_max"):
                assert out["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5 * math.log(64)), key
        for key in ("loss", "grad_norm"):
            assert out["first"][key] == pytest.approx(ref["first"][key], rel=1e-5), key


@pytest.mark.timeout(300)
def test_replay_under_virtual_pipeline_stages_equals_one_process():
    """4 layers over pp=2 x virtual_pp=2: each model chunk takes its own layers' columns of the recorded routes."""
    ref = replay_step(0, 1, {}, num_layers=4)
    assert ref["routes"].shape[2] == 4
    for rank, out in enumerate(run_distributed(replay_worker, 2, {"pp": 2, "virtual_pp": 2, "pp_schedule": "interleaved"}, None, 4)):
        assert out["metrics"]["mismatch/route_diff_mean"] == ref["metrics"]["mismatch/route_diff_mean"]
        for key in ("loss", "grad_norm"):
            assert out["first"][key] == pytest.approx(ref["first"][key], rel=1e-5), key


# ----------------------------------------------------------------------------- the router's gradient


@pytest.mark.timeout(60)
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_router_gradient_at_replayed_indices_is_the_formula(score_function):
    E, A, T, H, coef = 6, 2, 10, 8, 0.1
    cfg = MoEConfig(num_experts=E, top_k=A, score_function=score_function, norm_topk_prob=True, aux_loss_coef=coef)
    router = Router(cfg, H, ParallelState.single())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=g))
    x_TH = torch.randn(T, H, generator=g)
    recorded_TA = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    recorded_TA[-2:] = -1  # two tokens without a recorded route keep their own choice
    upstream_TA = torch.randn(T, A, generator=g)
    routing = router(x_TH.view(1, T, H), recorded_TA=recorded_TA + 1, replay=True)
    (routing.weights_TA * upstream_TA).sum().backward()

    w = router.weight.detach().double().requires_grad_()
    logits = x_TH.double() @ w.T
    scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
    own = torch.topk(scores.detach(), A, dim=-1).indices
    experts = torch.where(recorded_TA >= 0, recorded_TA, own)
    assert not torch.equal(experts[:-2].sort(-1).values, own[:-2].sort(-1).values)  # replay changed some choices
    gate = scores.gather(1, experts)
    gate = gate / gate.sum(-1, keepdim=True)
    probs = scores if score_function == "softmax" else scores / scores.sum(-1, keepdim=True)
    counts = torch.zeros(E, dtype=torch.float64).index_add_(0, experts.flatten(), torch.ones(T * A, dtype=torch.float64))
    aux = E * ((counts / (T * A)) * probs.mean(0)).sum()  # counts from the replayed experts, probabilities from the logits
    ((gate * upstream_TA.double()).sum() + coef * aux).backward()

    assert torch.equal(routing.experts_TA, experts)
    assert router.weight.grad.abs().sum() > 0
    assert_close_rel(router.weight.grad, w.grad, 1e-5, "router gradient")
    assert routing.aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)


# ----------------------------------------------------------------------------- wrong inputs


@pytest.mark.timeout(60)
def test_routes_that_do_not_fit_the_model_or_batch_are_refused():
    ppo = build(replay_config({}), ParallelState.single())
    _, batch = rollout_and_batch(ppo, ParallelState.single())
    model = ppo.actor.chunks[0]
    one_layer = batch["routes_BSLA"][:, :, :1]
    with pytest.raises(ValueError, match=r"expected \[B, S, 2, top_k\].*another model"):
        model(batch["input_ids_BS"], routes_BSLA=one_layer)
    with pytest.raises(ValueError, match=r"top_k=2"):
        model(batch["input_ids_BS"], routes_BSLA=batch["routes_BSLA"][..., :1])
    with pytest.raises(ValueError, match=r"routes_BSLA has shape .* expected \[8, .*, 2, 2\]"):
        ppo.step(dict(batch, routes_BSLA=one_layer))
    too_high = batch["routes_BSLA"].clone()
    too_high[0, 0, 0, 0] = 5  # expert 4 of a 4-expert model
    with pytest.raises(ValueError, match=r"expert ids .*\.\.4 .*num_experts=4"):
        ppo.step(dict(batch, routes_BSLA=too_high))
    without = {k: v for k, v in batch.items() if k != "routes_BSLA"}
    with pytest.raises(ConfigError, match=r"rl.routing_replay=rollout: the rollout batch has no recorded routes"):
        ppo.step(without)


def test_replay_on_a_dense_model_or_an_external_engine_is_refused_at_config_load():
    with pytest.raises(ConfigError, match=r"rl.routing_replay='rollout' on a dense model .*fix: rl.routing_replay=off"):
        load_config("tiny", None, ["model.num_dense_layers=2", "model.num_layers=2", "rl.routing_replay=rollout"])
    with pytest.raises(ConfigError, match=r"rl.routing_replay='rollout' with rollout.engine='external': only the in-process engine"):
        load_config("tiny", None, ["rollout.engine=external", "rollout.external_url=http://x:1", "rl.routing_replay=rollout"])
    with pytest.raises(ConfigError, match=r"rl.routing_replay='always': must be one of off, rollout"):
        load_config("tiny", None, ["rl.routing_replay=always"])
    assert load_config("tiny", None, ["rl.routing_replay=rollout"]).rl.routing_replay == "rollout"
