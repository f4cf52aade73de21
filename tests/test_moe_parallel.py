"""Parallel equals serial for the MoE layer: ep, ep x tp (sequence parallel), etp, both dispatchers, with padding.

Every rank builds the one-process layer with the same seed as a reference and runs it on
every data-parallel micro-batch; the parallel layer runs on this rank's share. Outputs and
input gradients must match the reference's slice; parameter gradients, reduced the way the
trainer does (partial_tp_grad-tagged over tp, experts over edp, dense over dp) and
gathered to full shape, must match the sum over micro-batches.
"""
from __future__ import annotations

import pytest
import torch

from megatron_seed.config import ModelConfig, MoEConfig, ParallelConfig
from megatron_seed.parallel.mappings import all_reduce_no_grad
from megatron_seed.parallel.sharding import gather_full, get_sharding, init_parameters
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from moe.layer import MoELayer
from tests.numerics import rel_err

B, S, H = 2, 8, 16
SEED = 7
SCENARIOS = ("random", "one_expert_gets_all", "half_the_experts_empty", "padded")


def _config(scenario: str, dispatcher: str) -> ModelConfig:
    moe = MoEConfig(
        num_experts=8, top_k=2, ffn_size=8, num_shared_experts=1, shared_ffn_size=8, dispatcher=dispatcher,
        aux_loss_coef=0.01, z_loss_coef=0.001, aux_loss_type="sequence" if scenario in ("random", "padded") else "micro_batch",
    )
    return ModelConfig(hidden_size=H, moe=moe)


def _inputs(scenario: str, micro_batch: int) -> tuple:
    gen = torch.Generator().manual_seed(100 + micro_batch)
    x = torch.randn(B, S, H, generator=gen)
    if scenario != "random":
        x[..., 0] = x[..., 0].abs() + 1.0  # a positive feature the router weights below key on
    return x, torch.randn(B, S, H, generator=gen)


def _valid(scenario: str):
    """Real-token mask of the full sequences (None: no padding): one row padded on both sides."""
    if scenario != "padded":
        return None
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :3] = False
    valid[0, -1] = False
    return valid


def _build(cfg: ModelConfig, ps: ParallelState, scenario: str) -> MoELayer:
    layer = MoELayer(cfg, ps)
    init_parameters(layer, SEED, ps, 0.3)
    with torch.no_grad():
        w = layer.router.weight  # replicated: the same edit on every rank
        if scenario == "one_expert_gets_all":
            w[3, 0] = 20.0
        elif scenario == "half_the_experts_empty":
            w[:4, 0] = -20.0
    return layer


def _worker(rank: int, world: int, layout: dict, dispatcher: str) -> dict:
    ps = ParallelState.build(ParallelConfig(**layout))
    tp, tp_rank, micro_batch = ps.tp_size, ps.tp_rank, ps.dp_rank
    errors = {}
    for scenario in SCENARIOS:
        cfg = _config(scenario, dispatcher)
        ref = _build(cfg, ParallelState.single(), scenario)
        ref_out = {}
        for d in range(ps.dp_size):
            x, g = _inputs(scenario, d)
            x.requires_grad_(True)
            y = ref(x, _valid(scenario))
            y.backward(g)
            ref_out[d] = (y.detach(), x.grad, ref.last_stats["aux_loss"], ref.last_stats["z_loss"])
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}

        layer = _build(cfg, ps, scenario)
        x, g = _inputs(scenario, micro_batch)
        chunk = slice(tp_rank * S // tp, (tp_rank + 1) * S // tp) if ps.sequence_parallel else slice(None)
        x_local = x[:, chunk].clone().requires_grad_(True)
        y = layer(x_local, _valid(scenario))
        y.backward(g[:, chunk])
        errors[f"{scenario}/output"] = rel_err(y.detach(), ref_out[micro_batch][0][:, chunk])
        errors[f"{scenario}/input_grad"] = rel_err(x_local.grad, ref_out[micro_batch][1][:, chunk])
        for name, p in layer.named_parameters():
            sharding, grad = get_sharding(p), p.grad.clone()
            if sharding.partial_tp_grad:
                all_reduce_no_grad(grad, ps.group("tp"))
            all_reduce_no_grad(grad, ps.group("edp" if sharding.is_expert else "dp"))
            grad.sharding = sharding  # gather_full reads the layout from the tensor it is given
            errors[f"{scenario}/{name}"] = rel_err(gather_full(grad, ps), ref_grads[name])
        counts = layer.last_stats["tokens_per_expert"].clone()
        errors[f"{scenario}/aux_loss_logged"] = rel_err(layer.last_stats["aux_loss"], ref_out[micro_batch][2])
        errors[f"{scenario}/z_loss_logged"] = rel_err(layer.last_stats["z_loss"], ref_out[micro_batch][3])
        all_reduce_no_grad(counts, ps.group("dp"))
        all_reduce_no_grad(counts, ps.group("tp"))
        errors[f"{scenario}/routed_to_expert3"] = int(counts[3])
        errors[f"{scenario}/routed_to_first_half"] = int(counts[:4].sum())
    return errors


LAYOUTS = [
    pytest.param(2, dict(ep=2), "alltoall", id="ep2"),
    pytest.param(4, dict(ep=4), "alltoall", id="ep4"),
    pytest.param(4, dict(ep=2, tp=2, sequence_parallel=True), "alltoall", id="ep2-tp2-sp"),
    pytest.param(4, dict(ep=2, tp=2, etp=2, sequence_parallel=True), "alltoall", id="ep2-tp2-etp2-sp"),
    pytest.param(4, dict(ep=2, tp=2, sequence_parallel=True), "allgather", id="allgather-ep2-tp2-sp"),
    pytest.param(2, dict(ep=2, tp=2), "alltoall", id="ep2-tp2-no-sp"),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,layout,dispatcher", LAYOUTS)
def test_moe_layer_parallel_equals_serial(world: int, layout: dict, dispatcher: str) -> None:
    results = run_distributed(_worker, world, layout, dispatcher)
    tokens = B * S * (world // layout.get("tp", 1))  # all micro-batches: one per dp rank
    for rank, errors in enumerate(results):
        assert errors["one_expert_gets_all/routed_to_expert3"] == tokens, errors
        assert errors["half_the_experts_empty/routed_to_first_half"] == 0, errors
        bad = {k: v for k, v in errors.items() if "routed" not in k and not v <= 1e-5}  # NaN too
        assert not bad, f"rank {rank}: relative errors above 1e-5: {bad}"
