"""PPO losses against per-token reference formulas, and dp=2 gradients equal to one process."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_seed.config import RLConfig
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.train.trainer import reduce_sums, sum_shares
from rl.losses import (
    LossNormalizer,
    actor_loss,
    compute_normalizer,
    explained_variance,
    k3_kl,
    masked_aggregate,
    policy_loss,
    positive_lm_loss,
    normalizer_units,
    value_loss,
    value_metrics,
)
from tests.numerics import assert_close_rel, rel_err


def random_inputs(seed=0, B=4, S=9):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        mask[b, start:start + int(torch.randint(1, S - start + 1, (1,), generator=g))] = True
    old = -torch.rand(B, S, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(B, S, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(B, S, generator=g, dtype=torch.float64)
    return new, old, adv, mask


def reference_token_losses(new, old, adv, mask, eps_low, eps_high, dual_clip):
    out = {}
    for b, t in mask.nonzero().tolist():
        r = math.exp(float(new[b, t] - old[b, t]))
        a = float(adv[b, t])
        l = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
        if dual_clip is not None and a < 0:
            l = min(l, -a * dual_clip)
        out[(b, t)] = l
    return out


def reference_aggregate(per_token, mask, agg):
    if agg == "token":
        return sum(per_token.values()) / len(per_token)
    seqs = [b for b in range(mask.shape[0]) if mask[b].any()]
    return sum(sum(v for (bb, _), v in per_token.items() if bb == b) / int(mask[b].sum()) for b in seqs) / len(seqs)


@pytest.mark.parametrize("agg", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_reference(agg, dual_clip):
    new, old, adv, mask = random_inputs(seed=1)
    adv[0, mask[0].nonzero()[0, 0]] = -2.0  # make sure one token hits the dual clip
    new[0, mask[0].nonzero()[0, 0]] = old[0, mask[0].nonzero()[0, 0]] + math.log(5.0)
    norm = compute_normalizer([mask])
    loss, m = policy_loss(new, old, adv, mask, norm, 0.2, 0.28, dual_clip, agg)
    ref = reference_token_losses(new, old, adv, mask, 0.2, 0.28, dual_clip)
    assert loss.item() == pytest.approx(reference_aggregate(ref, mask, agg), rel=1e-12)
    r = torch.exp(new - old)[mask]
    a = adv[mask]
    assert m["clip_frac_high"].item() == pytest.approx(((a > 0) & (r > 1.28)).double().mean().item())
    assert m["clip_frac_low"].item() == pytest.approx(((a < 0) & (r < 0.8)).double().mean().item())
    assert m["approx_kl"].item() == pytest.approx((r - 1 - r.log()).mean().item())
    if dual_clip is None:
        assert m["dual_clip_frac"].item() == 0
    else:
        assert m["dual_clip_frac"].item() == pytest.approx(((a < 0) & (r > dual_clip)).double().mean().item())


def _single_token(ratio, adv, eps_high, dual_clip=None):
    old = torch.zeros(1, 1, dtype=torch.float64)
    new = torch.full((1, 1), math.log(ratio), dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, m = policy_loss(new, old, torch.full((1, 1), adv, dtype=torch.float64), mask, compute_normalizer([mask]), 0.2, eps_high, dual_clip)
    loss.backward()
    return loss.item(), new.grad.item(), m


def test_clip_higher_asymmetry():
    # ratio 1.25, A > 0: inside [0.8, 1.28] so the gradient flows; with eps_high = 0.2 it is clipped
    loss, grad, m = _single_token(1.25, 1.0, eps_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and m["clip_frac_high"] == 0
    loss, grad, m = _single_token(1.25, 1.0, eps_high=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0 and m["clip_frac_high"] == 1
    # the low side is still clipped at 1 - eps_low = 0.8 for negative advantages
    loss, grad, m = _single_token(0.75, -1.0, eps_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0 and m["clip_frac_low"] == 1
    # a negative advantage with a large ratio is not clipped by the upper bound ...
    loss, grad, _ = _single_token(1.25, -1.0, eps_high=0.28)
    assert loss == pytest.approx(1.25) and grad == pytest.approx(1.25)


def test_dual_clip_bounds_negative_advantage():
    loss, grad, m = _single_token(5.0, -2.0, eps_high=0.28)
    assert loss == pytest.approx(10.0) and grad != 0
    loss, grad, m = _single_token(5.0, -2.0, eps_high=0.28, dual_clip=3.0)
    assert loss == pytest.approx(6.0) and grad == 0 and m["dual_clip_frac"] == 1
    # positive advantages are untouched by the dual clip
    assert _single_token(5.0, 2.0, 0.28, 3.0)[0] == pytest.approx(-2.0 * 1.28)


def test_token_vs_sequence_aggregation():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    norm = compute_normalizer([mask])
    assert (norm.tokens, norm.sequences) == (5.0, 2.0)
    assert masked_aggregate(x, mask, "token", norm.denominator("token")).item() == pytest.approx(9.0 / 5)
    assert masked_aggregate(x, mask, "sequence", norm.denominator("sequence")).item() == pytest.approx((1.0 + 5.0) / 2)
    with pytest.raises(ValueError, match="loss_agg"):
        masked_aggregate(x, mask, "mean", 1.0)


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_positive_lm_loss_only_on_positives(agg):
    new, _, _, mask = random_inputs(seed=2)
    new = new.clone().requires_grad_(True)
    positive = torch.tensor([True, False, True, False])
    positive_BS = positive[:, None].expand_as(mask)
    norm = compute_normalizer([mask], [positive_BS])
    loss = positive_lm_loss(new, mask, positive_BS, norm, agg)
    loss.backward()
    assert (new.grad[~positive] == 0).all()
    assert (new.grad[positive][mask[positive]] != 0).all()
    nll = {(b, t): -float(new[b, t].detach()) for b, t in mask.nonzero().tolist() if positive[b]}
    assert loss.item() == pytest.approx(reference_aggregate(nll, mask & positive[:, None], agg), rel=1e-12)


def test_no_positives_gives_zero_lm_loss():
    new, _, _, mask = random_inputs(seed=3)
    positive = torch.zeros_like(mask)
    norm = compute_normalizer([mask], [positive])
    assert positive_lm_loss(new, mask, positive, norm).item() == 0


def test_value_loss_clipping():
    values = torch.tensor([[1.0, 0.5, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 2.0, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    norm = compute_normalizer([mask])
    loss, m = value_loss(values, old, returns, mask, norm, clip=0.2)
    # token 0: max(1, 0.04)=1; token 1: max(2.25, 3.24)=3.24 (clipped larger); token 2: max(6.25, 0.09)=6.25
    assert loss.item() == pytest.approx(0.5 * (1.0 + 3.24 + 6.25) / 3)
    assert m["value_clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 1] == 0  # the clipped branch has no gradient
    unclipped, _ = value_loss(values, old, returns, mask, norm, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 2.25 + 6.25) / 3)


def test_explained_variance():
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(3, 50, generator=g)
    mask = torch.rand(3, 50, generator=g) > 0.3
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean = returns[mask].mean()
    assert explained_variance(torch.full_like(returns, mean.item()), returns, mask) == pytest.approx(0.0, abs=1e-6)
    noisy = returns + 0.5 * torch.randn(3, 50, generator=g)
    r, v = returns[mask].double(), noisy[mask].double()
    want = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert explained_variance(noisy, returns, mask) == pytest.approx(want.item(), rel=1e-6)
    # the same number from the value-loss metrics of two micro-batches
    norm = compute_normalizer([mask[:1], mask[1:]])
    parts = [value_loss(noisy[rows], returns[rows], returns[rows], mask[rows], norm)[1] for rows in ([0], [1, 2])]
    assert value_metrics(reduce_sums(sum_shares(parts), None, torch.device("cpu")))["explained_variance"] == pytest.approx(want.item(), rel=1e-6)


def test_k3_kl_nonnegative_and_zero_at_equality():
    a = torch.randn(3, 5)
    assert (k3_kl(a, a) == 0).all()
    assert (k3_kl(a, a + torch.randn(3, 5)) >= 0).all()


def test_actor_loss_requires_inputs_for_enabled_terms():
    new, old, adv, mask = random_inputs()
    norm = compute_normalizer([mask])
    with pytest.raises(ValueError, match="positive_BS"):
        actor_loss(new, old, adv, mask, norm, RLConfig(lm_loss_coef=0.1))
    with pytest.raises(ValueError, match="ref_logprobs_BS"):
        actor_loss(new, old, adv, mask, norm, RLConfig(lm_loss_coef=0.0, kl_coef=0.1))
    with pytest.raises(ValueError, match="log-probs of the sampled tokens"):
        policy_loss(new[:, :, None].expand(-1, -1, 7), old, adv, mask, norm)


# ----------------------------------------------------------------------------- dp equivalence

B_TOTAL, S_MAX, H, V = 6, 10, 8, 16
SPLITS = {0: [[0], [1, 2]], 1: [[3, 4, 5]]}  # rank -> micro-batches (sequence ids); uneven on purpose


def make_problem():
    g = torch.Generator().manual_seed(11)
    lengths = [9, 1, 4, 7, 2, 10]  # uneven response lengths
    mask = torch.zeros(B_TOTAL, S_MAX, dtype=torch.bool)
    for b, l in enumerate(lengths):  # odd rows left-padded, even rows right-padded
        if b % 2:
            mask[b, S_MAX - l:] = True
        else:
            mask[b, :l] = True
    x = torch.randn(B_TOTAL, S_MAX, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B_TOTAL, S_MAX), generator=g)
    old = -torch.rand(B_TOTAL, S_MAX, generator=g, dtype=torch.float64) * 3
    ref = old + 0.1 * torch.randn(B_TOTAL, S_MAX, generator=g, dtype=torch.float64)
    adv = torch.randn(B_TOTAL, S_MAX, generator=g, dtype=torch.float64)
    old_values = torch.randn(B_TOTAL, S_MAX, generator=g, dtype=torch.float64)
    returns = torch.randn(B_TOTAL, S_MAX, generator=g, dtype=torch.float64)
    positive = torch.tensor([True, False, True, True, False, False])[:, None].expand(B_TOTAL, S_MAX)
    torch.manual_seed(0)
    policy = torch.nn.Linear(H, V).double()
    critic = torch.nn.Linear(H, 1).double()
    return dict(mask=mask, x=x, tokens=tokens, old=old, ref=ref, adv=adv, old_values=old_values,
                returns=returns, positive=positive), policy.state_dict(), critic.state_dict()


def micro_batch_loss(policy, critic, data, rows, norm, cfg):
    mb = {k: v[rows] for k, v in data.items()}
    keep = mb["mask"].any(dim=0).nonzero().flatten()  # trim columns no sequence uses: padding must not matter
    mb = {k: (v[:, keep[0]:keep[-1] + 1] if v.dim() >= 2 else v) for k, v in mb.items()}
    logits = policy(mb["x"])
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, mb["tokens"][..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss, metrics = actor_loss(logprobs, mb["old"], mb["adv"], mb["mask"], norm, cfg, mb["positive"], mb["ref"], entropy)
    values = critic(mb["x"])[..., 0]
    vloss, vmetrics = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], norm, cfg.value_clip, cfg.loss_agg)
    return loss + vloss, {**metrics, **vmetrics}


def run_step(policy_sd, critic_sd, data, micro_batches, cfg, group):
    policy = torch.nn.Linear(H, V).double()
    critic = torch.nn.Linear(H, 1).double()
    policy.load_state_dict(policy_sd)
    critic.load_state_dict(critic_sd)
    units = sum_shares([normalizer_units(data["mask"][rows], data["positive"][rows]) for rows in micro_batches])
    norm = LossNormalizer.from_totals(reduce_sums(units, group, torch.device("cpu")))
    metrics = []
    for rows in micro_batches:
        loss, m = micro_batch_loss(policy, critic, data, rows, norm, cfg)
        loss.backward()
        metrics.append(m)
    grads = [p.grad for p in list(policy.parameters()) + list(critic.parameters())]
    if group is not None:
        import torch.distributed as dist

        for g in grads:
            dist.all_reduce(g, group=group)
    return grads, value_metrics(reduce_sums(sum_shares(metrics), group, torch.device("cpu")))


DP_CFG = RLConfig(lm_loss_coef=0.3, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, value_clip=0.2)


def _dp_worker(rank, world, agg):
    import torch.distributed as dist

    data, policy_sd, critic_sd = make_problem()
    grads, metrics = run_step(policy_sd, critic_sd, data, SPLITS[rank], dataclasses.replace(DP_CFG, loss_agg=agg), dist.group.WORLD)
    # numpy pickles by value: a torch tensor would travel as a shared-memory handle that dies with this process
    return [g.numpy() for g in grads], metrics


@pytest.mark.timeout(120)
@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_dp2_gradients_equal_one_process(agg):
    data, policy_sd, critic_sd = make_problem()
    want, want_metrics = run_step(policy_sd, critic_sd, data, [list(range(B_TOTAL))], dataclasses.replace(DP_CFG, loss_agg=agg), None)
    results = run_distributed(_dp_worker, 2, agg)
    for grads, metrics in results:
        for g, w in zip(grads, want):
            assert_close_rel(g, w, 1e-5, "gradient")
        for k, v in want_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # a per-rank mean (the naive loss) would not match: the check above is not vacuous
    data_r0 = {k: v[[0, 1, 2]] for k, v in data.items()}
    naive, _ = run_step(policy_sd, critic_sd, data_r0, [[0, 1, 2]], dataclasses.replace(DP_CFG, loss_agg=agg), None)
    assert rel_err(naive[0], want[0]) > 1e-3


def test_normalizer_denominators():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    positive = torch.tensor([True, True, False])[:, None].expand_as(mask)
    norm = compute_normalizer([mask, mask[:1]], [positive, positive[:1]])
    want = LossNormalizer(tokens=7.0, sequences=3.0, positive_tokens=4.0, positive_sequences=2.0)
    assert norm == want
    assert norm.denominator("sequence", positive=True) == 2.0
    # the same sequences packed into one row (rl.packing): documents, not rows, are the sequences
    packed = {"mask": torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool),
              "positive": torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 1]], dtype=torch.bool),
              "docs": torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])}
    units = normalizer_units(packed["mask"], packed["positive"], packed["docs"])
    assert LossNormalizer.from_totals({k: float(v) for k, v in units.items()}) == LossNormalizer(
        tokens=7.0, sequences=3.0, positive_tokens=4.0, positive_sequences=2.0)
