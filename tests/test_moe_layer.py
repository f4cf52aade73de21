"""The MoE layer in one process: HF Qwen3-MoE equivalence, router variants, losses, capacity."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from megatron_seed.config import ConfigError, ModelConfig, MoEConfig
from megatron_seed.parallel.sharding import init_parameters
from megatron_seed.parallel.state import ParallelState
from moe.kernels import inductor, reference, resolve_backend
from moe.layer import MoELayer
from moe.router import apply_capacity
from tests.numerics import assert_close_rel


def _layer(H: int = 32, seed: int = 0, **moe) -> MoELayer:
    cfg = ModelConfig(hidden_size=H, moe=MoEConfig(**{"num_experts": 8, "top_k": 2, "ffn_size": 16, "aux_loss_coef": 0.0, **moe}))
    layer = MoELayer(cfg, ParallelState.single())
    init_parameters(layer, seed, ParallelState.single(), 0.2)
    return layer


def _hf_copy(layer: MoELayer, norm_topk_prob: bool = True) -> Qwen3MoeSparseMoeBlock:
    E, _, F, H = layer.experts.w_gate_up.shape
    hc = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=layer.moe_cfg.top_k, norm_topk_prob=norm_topk_prob)
    hf = Qwen3MoeSparseMoeBlock(hc)
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router.weight)
        hf.experts.gate_up_proj.copy_(layer.experts.w_gate_up.reshape(E, 2 * F, H))
        hf.experts.down_proj.copy_(layer.experts.w_down)
    return hf


@pytest.mark.parametrize(
    "H,F,norm,backend",
    [(32, 16, True, "torch"), (20, 6, False, "torch"), (32, 16, True, "inductor")],  # (20, 6): strides unfit for _grouped_mm -> padded bmm
)
def test_matches_hf_qwen3_moe_block(H: int, F: int, norm: bool, backend: str) -> None:
    torch.manual_seed(0)
    layer = _layer(H=H, ffn_size=F, norm_topk_prob=norm, kernel_backend=backend)
    hf = _hf_copy(layer, norm)
    x = torch.randn(3, 7, H, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 7, H)
    y, y_hf = layer(x), hf(x_hf)
    y.backward(g)
    y_hf.backward(g)
    assert_close_rel(y, y_hf, 1e-5, "output")
    assert_close_rel(x.grad, x_hf.grad, 1e-5, "input gradient")
    assert_close_rel(layer.router.weight.grad, hf.gate.weight.grad, 1e-5, "router gradient")
    assert_close_rel(layer.experts.w_gate_up.grad.reshape(hf.experts.gate_up_proj.shape), hf.experts.gate_up_proj.grad, 1e-5, "gate_up gradient")
    assert_close_rel(layer.experts.w_down.grad, hf.experts.down_proj.grad, 1e-5, "down gradient")


def test_shared_experts_are_added_to_the_routed_output() -> None:
    torch.manual_seed(1)
    layer = _layer(num_shared_experts=2, shared_ffn_size=8)
    x = torch.randn(2, 5, 32)
    shared = layer.shared_experts
    routed_only = _layer()
    with torch.no_grad():
        for name, p in routed_only.named_parameters():
            p.copy_(dict(layer.named_parameters())[name])
        h = torch.nn.functional.silu(x @ shared.gate_proj.weight.T) * (x @ shared.up_proj.weight.T)
        expected = routed_only(x) + h @ shared.down_proj.weight.T
        assert shared.gate_proj.weight.shape == (16, 32)
        assert_close_rel(layer(x), expected, 1e-5)


def _aux_by_formula(layer: MoELayer, x_BSH: torch.Tensor, per_sequence: bool) -> float:
    """E * sum_e f_e P_e with f_e = count_e / (T A), P_e = mean prob, per micro-batch or sequence."""
    E, A = layer.moe_cfg.num_experts, layer.moe_cfg.top_k
    rows = x_BSH if per_sequence else x_BSH.reshape(1, -1, x_BSH.shape[-1])
    losses = []
    for x_SH in rows:
        probs = torch.softmax(x_SH @ layer.router.weight.T, -1)
        top = probs.topk(A, dim=-1).indices
        f = torch.bincount(top.flatten(), minlength=E) / (x_SH.shape[0] * A)
        losses.append(E * float((f * probs.mean(0)).sum()))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("aux_type", ["micro_batch", "sequence"])
@pytest.mark.parametrize("output_grad", [1.0, 0.0])
def test_aux_and_z_losses_reach_the_router_gradient(aux_type: str, output_grad: float) -> None:
    """The router gradient is that of ``output_grad * sum(y) + scale * (coef * L_aux + z_coef * L_z)``.

    With ``output_grad = 0`` it is the losses' gradient alone, so a missing or mis-scaled
    loss shows at full size; with 1 the losses are ~1e-3 of the gradient's norm, still
    ~100x the tolerance.
    """
    torch.manual_seed(2)
    coef, z_coef, scale = 0.5, 0.1, 0.25
    layer = _layer(aux_loss_coef=coef, z_loss_coef=z_coef, aux_loss_type=aux_type)
    layer.aux_loss_scale = scale
    x = torch.randn(3, 6, 32)
    (output_grad * layer(x).sum()).backward()
    grad_with_losses = layer.router.weight.grad.clone()
    per_sequence = aux_type == "sequence"
    assert layer.last_stats["aux_loss"].item() == pytest.approx(_aux_by_formula(layer, x, per_sequence), rel=1e-5)

    # the same gradient by adding the losses by hand to a layer without them
    plain = _layer()
    plain.load_state_dict(layer.state_dict())
    logits = x.reshape(-1, 32) @ plain.router.weight.T
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, dim=-1).indices.detach()
    rows = 3 if per_sequence else 1
    counts = torch.zeros(rows, 8).scatter_add_(1, top.view(rows, -1), torch.ones(rows, top.numel() // rows))
    aux = 8 * ((counts / (probs.shape[0] / rows * 2)) * probs.view(rows, -1, 8).mean(1)).sum(1).mean()
    z = torch.logsumexp(logits, -1).square().mean()
    (output_grad * plain(x).sum() + scale * (coef * aux + z_coef * z)).backward()
    assert_close_rel(grad_with_losses, plain.router.weight.grad, 1e-5, "router gradient")
    assert layer.last_stats["z_loss"].item() == pytest.approx(z.item(), rel=1e-5)


@pytest.mark.parametrize("aux_type", ["micro_batch", "sequence"])
def test_padding_counts_in_no_statistic(aux_type: str) -> None:
    """A padded batch gives the losses, router gradient and loads of its real tokens alone."""
    torch.manual_seed(4)
    layer = _layer(aux_loss_coef=0.5, z_loss_coef=0.1, aux_loss_type=aux_type)
    x = torch.randn(3, 6, 32)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 4:] = False  # right padding
    valid[1, :2] = False  # left padding
    valid[2] = False  # a row of padding only
    (layer(x, valid) * valid.unsqueeze(-1)).sum().backward()
    padded = {k: v.clone() for k, v in layer.last_stats.items()}
    padded_grad = layer.router.weight.grad.clone()

    layer.zero_grad()
    if aux_type == "sequence":  # the real rows, each with only its real tokens: run them one at a time
        stats = []
        for row in range(2):
            with torch.no_grad():  # training mode: the statistics are still computed
                layer(x[row, valid[row]].unsqueeze(0))
            stats.append(dict(layer.last_stats))
        # mean over sequences of the aux loss; the z-loss is a mean over all real tokens
        n0, n1 = int(valid[0].sum()), int(valid[1].sum())
        aux = (stats[0]["aux_loss"] + stats[1]["aux_loss"]) / 2
        assert padded["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-5)
        z = (stats[0]["z_loss"] * n0 + stats[1]["z_loss"] * n1) / (n0 + n1)
        assert padded["z_loss"].item() == pytest.approx(z.item(), rel=1e-5)
        torch.testing.assert_close(padded["tokens_per_expert"], stats[0]["tokens_per_expert"] + stats[1]["tokens_per_expert"])
        return
    real = x[valid].unsqueeze(0)
    layer(real).sum().backward()
    for key in ("aux_loss", "z_loss"):
        assert padded[key].item() == pytest.approx(layer.last_stats[key].item(), rel=1e-5), key
    torch.testing.assert_close(padded["tokens_per_expert"], layer.last_stats["tokens_per_expert"])
    assert_close_rel(padded_grad, layer.router.weight.grad, 1e-5, "router gradient")


def test_model_passes_its_padding_mask_to_the_moe_layers() -> None:
    from megatron_seed.model.gpt import GPTModel
    from tests.model_utils import tiny_model

    cfg = tiny_model()
    model = GPTModel(cfg, ParallelState.single())
    model.init_weights(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :3] = False
    model(ids, padding_mask_BS=valid)
    for layer in model.moe_layers():
        assert int(layer.last_stats["tokens_per_expert"].sum()) == int(valid.sum()) * cfg.moe.top_k


def test_sigmoid_routing_with_groups_and_bias() -> None:
    torch.manual_seed(3)
    logits = torch.randn(10, 8)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    w, e, scores = reference.topk_routing(logits, 2, "sigmoid", True, bias, num_groups=4, top_groups=2)
    assert (e == 4).any(dim=1).all()  # the bias steers every token to expert 4 ...
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, e) / torch.sigmoid(logits).gather(1, e).sum(-1, keepdim=True))
    groups = torch.div(e, 2, rounding_mode="floor")
    assert all(len(set(row.tolist())) <= 2 for row in groups)  # ... and experts come from at most 2 groups


def test_group_limited_topk_picks_experts_only_in_the_best_groups() -> None:
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.8, 0.5, 0.5]])  # groups (0.9,0) (0,0.8) (0.5,0.5); best by top-1 sum: g0, g1
    e = reference.select_experts(scores, 2, num_groups=3, top_groups=2)
    assert sorted(e[0].tolist()) == [0, 3]
    e = reference.select_experts(scores, 2, num_groups=1)
    assert sorted(e[0].tolist()) == [0, 3]
    # one group: scored by its best top_k // top_groups = 2 experts, so (0.5, 0.5) beats (0.9, 0.0)
    e = reference.select_experts(torch.tensor([[0.9, 0.0, 0.0, 0.1, 0.5, 0.5]]), 2, num_groups=3, top_groups=1)
    assert sorted(e[0].tolist()) == [4, 5]


def test_capacity_keeps_the_highest_weighted_slots() -> None:
    weights = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 0]])
    kept = apply_capacity(weights, experts, 4, capacity_factor=1.0)  # capacity ceil(1 * 4 * 2 / 4) = 2
    assert kept.tolist() == [[0, 1], [0, 1], [4, 2], [3, 4]]


def test_capacity_drops_tokens_from_the_output() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 16, 32)
    dropless = _layer()
    dropping = _layer(capacity_factor=0.25)
    y_full, y_drop = dropless(x), dropping(x)
    capacity = math.ceil(0.25 * 16 * 2 / 8)
    assert dropping.last_stats["tokens_per_expert"].max() > capacity  # some slots really were dropped
    assert not torch.allclose(y_full, y_drop)
    assert (y_drop.abs().sum(-1) <= y_full.abs().sum(-1) + 1e-4).float().mean() > 0.5


def test_backend_selection_and_bad_names() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("inductor", torch.device("cpu")) == "inductor"
    with pytest.raises(ConfigError, match="kernel_backend"):
        resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ConfigError, match="dispatcher"):
        _layer(dispatcher="ring")(torch.randn(1, 2, 32))


def test_grouped_mm_paths_agree_with_a_loop() -> None:
    torch.manual_seed(5)
    counts = torch.tensor([3, 0, 5, 1])
    for K, O in [(8, 16), (5, 3)]:
        x = torch.randn(int(counts.sum()), K)
        w = torch.randn(4, K, O)
        loop = torch.cat([x[s - c : s] @ w[e] for e, (c, s) in enumerate(zip(counts, counts.cumsum(0)))])
        assert_close_rel(reference.grouped_mm(x, w, counts), loop, 1e-5)


@pytest.mark.parametrize("transposed_weight", [False, True])
def test_grouped_mm_gradients_match_a_loop(transposed_weight: bool) -> None:
    torch.manual_seed(6)
    counts = torch.tensor([3, 0, 5, 1])  # an empty expert must get a zero weight gradient
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    storage = torch.randn(4, 16, 8) if transposed_weight else torch.randn(4, 8, 16)
    storage.requires_grad_(True)
    w = storage.transpose(1, 2) if transposed_weight else storage
    g = torch.randn(x.shape[0], 16)
    got = torch.autograd.grad((reference.grouped_mm(x, w, counts) * g).sum(), (x, storage))
    loop = torch.cat([x[s - c : s] @ w[e] for e, (c, s) in enumerate(zip(counts, counts.cumsum(0)))])
    want = torch.autograd.grad((loop * g).sum(), (x, storage))
    for a, b in zip(got, want):
        assert_close_rel(a, b, 1e-5)
    assert not got[1][1].any()  # exactly zero, not merely small next to the norm


def test_weighted_swiglu_matches_autograd() -> None:
    torch.manual_seed(7)
    gate_up = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(reference.swiglu, (gate_up, weights))
    torch.autograd.gradcheck(reference.swiglu, (gate_up,))
    gate, up = gate_up.chunk(2, dim=1)
    torch.testing.assert_close(reference.swiglu(gate_up, weights), weights[:, None] * torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("weighted", [True, False])
def test_inductor_swiglu_matches_the_reference(weighted: bool) -> None:
    """The compiled SwiGLU: same values and gradients as the eager reference, any row count (none included)."""
    torch.manual_seed(8)
    for N, F in [(37, 5), (6, 16), (0, 5)]:
        gate_up = torch.randn(N, 2 * F, requires_grad=True)
        weights = torch.rand(N, requires_grad=True) if weighted else None
        grad = torch.randn(N, F)
        leaves = (gate_up, weights) if weighted else (gate_up,)
        got = inductor.swiglu(gate_up, weights)
        want = reference.swiglu(gate_up, weights)
        assert_close_rel(got, want, 1e-5)
        for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
            assert_close_rel(a, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_inference_grouped_mm_on_cpu_matches_a_loop(transposed_weight: bool, dtype: torch.dtype) -> None:
    """The no-grad path (the staged per-expert GEMM of rollout and evaluation), eager and (for the experts' transposed
    weight views, the layout decode steps use) compiled, with empty experts (first and last too); bf16 is the product
    of the bf16 numbers rounded once to bf16 (relative error up to 2^-8 per element)."""
    torch.manual_seed(7)
    counts = torch.tensor([0, 3, 0, 5, 1, 0])
    x = torch.randn(int(counts.sum()), 24).to(dtype)
    storage = (torch.randn(6, 40, 24) if transposed_weight else torch.randn(6, 24, 40)).to(dtype)
    w = storage.transpose(1, 2) if transposed_weight else storage
    loop = torch.cat([x[s - c : s].double() @ w[e].double() for e, (c, s) in enumerate(zip(counts, counts.cumsum(0)))])
    with torch.no_grad():
        results = [reference.grouped_mm(x, w, counts)]
        if transposed_weight:
            results.append(torch.compile(reference.grouped_mm, fullgraph=True)(x, w, counts))
    for got in results:
        assert got.dtype == dtype
        assert_close_rel(got.double(), loop, 1e-6 if dtype == torch.float32 else 2**-8)
