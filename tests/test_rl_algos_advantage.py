"""GAE variants against a per-sequence, per-token reference loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_seed.config import RLConfig
from megatron_seed.parallel.spawn import run_distributed
from rl.advantage import (
    compute_advantages,
    gae,
    length_adaptive_lambda,
    masked_whiten,
    place_terminal_reward,
)


def reference_gae(rewards, values, mask, gamma, lam_per_seq, truncated=None):
    """Textbook GAE, one sequence and one token at a time, on the list of response positions."""
    B, S = mask.shape
    adv = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        pos = [t for t in range(S) if mask[b, t]]
        lam = float(lam_per_seq[b])
        next_v = float(values[b, pos[-1]]) if (truncated is not None and truncated[b] and pos) else 0.0
        next_a = 0.0
        for t in reversed(pos):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            next_a = delta + gamma * lam * next_a
            adv[b, t] = next_a
            next_v = float(values[b, t])
    return adv


def random_batch(seed=0, B=5, S=12, gaps=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, 4, (1,), generator=g))
        length = int(torch.randint(1, S - start + 1, (1,), generator=g))
        mask[b, start:start + length] = True
        if gaps and length > 3:
            mask[b, start + 1] = False
    values = torch.randn(B, S, generator=g, dtype=torch.float64)
    values[~mask] = float("nan")  # padding is never read
    rewards = torch.randn(B, S, generator=g, dtype=torch.float64) * mask
    return rewards, values, mask


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.7), (0.99, 0.0)])
def test_gae_matches_reference(gamma, lam, gaps):
    rewards, values, mask = random_batch(seed=int(lam * 100) + gaps, gaps=gaps)
    got = gae(rewards, values, mask, gamma, lam)
    want = reference_gae(rewards, values, mask, gamma, [lam] * mask.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(got).any()


def test_gae_per_sequence_lambda_and_truncation():
    rewards, values, mask = random_batch(seed=3)
    lam_B = torch.tensor([0.0, 0.3, 0.95, 1.0, 0.5], dtype=torch.float64)
    truncated = torch.tensor([True, False, True, False, True])
    got = gae(rewards, values, mask, 0.97, lam_B, truncated)
    want = reference_gae(rewards, values, mask, 0.97, lam_B, truncated)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # truncation changes exactly the truncated rows
    plain = gae(rewards, values, mask, 0.97, lam_B)
    changed = (got != plain).any(dim=1)
    assert changed.tolist() == truncated.tolist()


def test_monte_carlo_returns_with_lambda_one():
    """gamma = lambda = 1: the value target is the sum of future rewards, whatever the critic says."""
    _, values, mask = random_batch(seed=4)
    reward_B = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    rewards = place_terminal_reward(reward_B, mask)
    cfg = RLConfig(gamma=1.0, lambda_value=1.0, whiten_advantages=False)
    out = compute_advantages(rewards, values, mask, cfg)
    expected = reward_B[:, None].expand_as(mask) * mask
    torch.testing.assert_close(out.returns_BS, expected.to(out.returns_BS.dtype))


def test_place_terminal_reward():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    r = place_terminal_reward(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert r.tolist() == [[0, 0, 1, 0], [0, 0, 0, 2], [0, 0, 3, 0]]
    with pytest.raises(ValueError, match="no response tokens"):
        place_terminal_reward(torch.tensor([1.0]), torch.zeros(1, 3, dtype=torch.bool))


def test_length_adaptive_lambda():
    lengths = torch.tensor([0, 10, 20, 40, 100, 1000, 10000])
    lam = length_adaptive_lambda(lengths, alpha=0.05)
    want = [0.0, 0.0, 0.0, 0.5, 0.8, 0.98, 0.998]
    torch.testing.assert_close(lam, torch.tensor(want, dtype=torch.float64))


def test_decoupled_length_adaptive_compute_advantages():
    rewards, values, mask = random_batch(seed=5, S=40)
    truncated = torch.tensor([False, True, False, False, True])
    cfg = RLConfig(gamma=1.0, lambda_value=1.0, length_adaptive=True, length_alpha=0.1, whiten_advantages=False)
    out = compute_advantages(rewards, values, mask, cfg, truncated)
    lengths = mask.sum(1).double()
    lam_policy = (1 - 1 / (0.1 * lengths)).clamp(0, 1)
    torch.testing.assert_close(out.lambda_policy_B, lam_policy)
    torch.testing.assert_close(out.advantages_BS, reference_gae(rewards, values, mask, 1.0, lam_policy, truncated))
    value_adv = reference_gae(rewards, values, mask, 1.0, [1.0] * 5, truncated)
    torch.testing.assert_close(out.returns_BS, torch.where(mask, value_adv + values, 0.0))
    # fixed lambda_policy when length adaptation is off
    fixed = compute_advantages(rewards, values, mask, dataclasses.replace(cfg, length_adaptive=False, lambda_policy=0.9), truncated)
    torch.testing.assert_close(fixed.advantages_BS, reference_gae(rewards, values, mask, 1.0, [0.9] * 5, truncated))


def test_whitening_single_process():
    rewards, values, mask = random_batch(seed=6)
    x = gae(rewards, values, mask, 1.0, 0.95)
    w = masked_whiten(x, mask)
    valid = w[mask]
    assert abs(valid.mean().item()) < 1e-9
    assert abs(valid.var(unbiased=True).item() - 1.0) < 1e-6
    assert (w[~mask] == 0).all()


def _whiten_worker(rank, world, x, mask):
    import torch.distributed as dist

    rows = [[0, 1], [2, 3, 4]][rank]  # uneven split of the batch
    # numpy pickles by value: a torch tensor would travel as a shared-memory handle that dies with this process
    return masked_whiten(x[rows], mask[rows], dist.group.WORLD).numpy()


@pytest.mark.timeout(120)
def test_whitening_over_dp_equals_one_process():
    rewards, values, mask = random_batch(seed=7)
    x = gae(rewards, values, mask, 1.0, 0.95)
    parts = run_distributed(_whiten_worker, 2, x, mask)
    got = torch.cat([torch.from_numpy(p) for p in parts])
    torch.testing.assert_close(got, masked_whiten(x, mask), rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_named():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="values_BS has shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), mask, 1.0, 0.9)
    with pytest.raises(ValueError, match="2-D bool"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), mask.float(), 1.0, 0.9)
