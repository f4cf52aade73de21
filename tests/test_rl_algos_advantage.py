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
    reverse_linear_scan,
    values_after_response,
)


def reference_gae(rewards, values, mask, gamma, lam_per_seq, truncated=None, values_after=None):
    """Textbook GAE, one sequence and one token at a time, on the list of response positions;
    a truncated row bootstraps from ``values_after[b]``, the value after its last token."""
    B, S = mask.shape
    adv = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        pos = [t for t in range(S) if mask[b, t]]
        lam = float(lam_per_seq[b])
        next_v = float(values_after[b]) if (truncated is not None and truncated[b] and pos) else 0.0
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
    after = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = gae(rewards, values, mask, 0.97, lam_B, truncated, after)
    want = reference_gae(rewards, values, mask, 0.97, lam_B, truncated, after)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # truncation changes exactly the truncated rows
    plain = gae(rewards, values, mask, 0.97, lam_B)
    changed = (got != plain).any(dim=1)
    assert changed.tolist() == truncated.tolist()
    # the last token's own value is V before it was sampled: bootstrapping from it is the old bug
    last = torch.where(mask, torch.arange(mask.shape[1]), -1).amax(1)
    wrong = reference_gae(rewards, values, mask, 0.97, lam_B, truncated, values[torch.arange(5), last])
    assert not torch.allclose(got, wrong)
    with pytest.raises(ValueError, match="values_after_B"):
        gae(rewards, values, mask, 0.97, lam_B, truncated)


def test_values_after_response_reads_one_past_the_last_token():
    mask = torch.tensor([[False, True, True, False, False], [True, True, True, True, False]])
    values = torch.arange(10, dtype=torch.float64).view(2, 5)
    assert values_after_response(values, mask).tolist() == [3.0, 9.0]
    full = torch.tensor([[False, True, True, True, True]])
    with pytest.raises(ValueError, match="append_bootstrap_column"):
        values_after_response(torch.zeros(1, 5), full)


@pytest.mark.parametrize("S", [1, 2, 7, 64, 1000])
def test_reverse_linear_scan_equals_the_loop(S):
    g = torch.Generator().manual_seed(S)
    deltas = torch.randn(3, S, dtype=torch.float64, generator=g)
    decays = torch.rand(3, S, dtype=torch.float64, generator=g) * 1.1  # above 1 too: nothing assumes a contraction
    decays[0, S // 2] = 0.0  # lambda = 0 cuts the carry
    want = torch.zeros_like(deltas)
    carry = torch.zeros(3, dtype=torch.float64)
    for t in range(S - 1, -1, -1):
        carry = deltas[:, t] + decays[:, t] * carry
        want[:, t] = carry
    got = reverse_linear_scan(deltas, decays)
    assert float((got - want).norm() / want.norm()) < 1e-13


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
    after = torch.tensor([0.0, 0.7, 0.0, 0.0, -1.3], dtype=torch.float64)
    cfg = RLConfig(gamma=1.0, lambda_value=1.0, length_adaptive=True, length_alpha=0.1, whiten_advantages=False)
    out = compute_advantages(rewards, values, mask, cfg, truncated, values_after_B=after)
    lengths = mask.sum(1).double()
    lam_policy = (1 - 1 / (0.1 * lengths)).clamp(0, 1)
    torch.testing.assert_close(out.lambda_policy_B, lam_policy)
    torch.testing.assert_close(out.advantages_BS, reference_gae(rewards, values, mask, 1.0, lam_policy, truncated, after))
    value_adv = reference_gae(rewards, values, mask, 1.0, [1.0] * 5, truncated, after)
    torch.testing.assert_close(out.returns_BS, torch.where(mask, value_adv + values, 0.0))
    # fixed lambda_policy when length adaptation is off
    fixed = compute_advantages(rewards, values, mask, dataclasses.replace(cfg, length_adaptive=False, lambda_policy=0.9), truncated,
                               values_after_B=after)
    torch.testing.assert_close(fixed.advantages_BS, reference_gae(rewards, values, mask, 1.0, [0.9] * 5, truncated, after))


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


@pytest.mark.timeout(120)
def test_ppo_truncation_bootstrap_is_the_critics_value_of_the_whole_response():
    """Through PPOTrainer.prepare: a truncated row's return at its last token (gamma = lambda = 1) is
    r + V(prompt + whole response), the critic run on the full row, even when the row fills the batch."""
    from megatron_seed.parallel.state import ParallelState
    from megatron_seed.train.trainer import Trainer
    from rl.experience import from_sequences
    from rl.ppo import PPOTrainer, init_critic_from_actor, rl_trainer_config
    from tests.model_utils import tiny_config, tiny_model

    cfg = tiny_config(tiny_model(), micro_batch_size=2)
    cfg.rl = RLConfig(gamma=1.0, lambda_value=1.0, whiten_advantages=False, lm_loss_coef=0.0)
    ps = ParallelState.single()
    actor = Trainer(rl_trainer_config(cfg, "actor", 4), ps)
    critic = Trainer(rl_trainer_config(cfg, "critic", 4), ps)
    init_critic_from_actor(critic, actor)
    prompts, responses = [[5, 6], [7, 8, 9], [3, 4], [10, 11]], [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [12]]
    rewards, truncated = [0.5, 1.0, -1.0, 0.0], [True, True, False, False]  # row 0 fills the width
    batch, _ = PPOTrainer(actor, critic, cfg.rl, bootstrap_truncated=True).prepare(
        from_sequences(prompts, responses, rewards, truncated=truncated))
    critic.chunks[0].eval()
    for b in range(4):
        row = torch.tensor([prompts[b] + responses[b]])
        with torch.no_grad():
            v_after = float(critic.chunks[0](row)[0, -1])  # V(tokens[:n]): the state after the last token
        last = len(prompts[b]) + len(responses[b]) - 2
        want = rewards[b] + (v_after if truncated[b] else 0.0)
        assert float(batch["returns_BS"][b, last]) == pytest.approx(want, rel=1e-5, abs=1e-6)
