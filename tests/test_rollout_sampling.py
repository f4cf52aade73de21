"""Sampling controls: empirical frequencies vs the filtered softmax, greedy, filters, log-probs, seeding."""
import pytest
import torch

from megatron_seed.config import ConfigError
from megatron_seed.parallel.state import ParallelState
from rl.rollout.sampling import SamplingParams, filter_logits, row_generators, row_seed, sample

PS = ParallelState.single()
LOGITS_V = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected_probs(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered softmax written out directly: sort, keep top-k, keep until the mass reaches top-p."""
    probs = torch.softmax(logits_V / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept_mass = 0.0
    for rank, v in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or kept_mass >= top_p:
            break
        keep[v] = True
        kept_mass += float(probs[v])
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.8), (1.3, 5, 0.95), (1.0, 0, 1.0), (0.5, 3, 1.0)])
def test_empirical_frequencies_match_filtered_softmax(temperature, top_k, top_p):
    draws = 20000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gens = row_generators([row_seed(11, i) for i in range(draws)])
    tokens, _ = sample(LOGITS_V.expand(draws, -1), params, gens, PS)
    freq = torch.bincount(tokens, minlength=len(LOGITS_V)).double()
    p = expected_probs(LOGITS_V, temperature, top_k, top_p).double()
    assert (freq[p == 0] == 0).all(), "a filtered-out token was sampled"
    kept = p > 0
    chi2 = float(((freq[kept] - draws * p[kept]) ** 2 / (draws * p[kept])).sum())
    dof = int(kept.sum()) - 1
    # chi-square 99.99% quantile is below dof + 4.5 * sqrt(2 dof) + 8 for dof <= 7
    assert chi2 < dof + 4.5 * (2 * dof) ** 0.5 + 8, (chi2, freq.tolist(), (draws * p).tolist())


def test_filter_keeps_the_token_crossing_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 0, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]


def test_greedy_is_argmax_and_log_probs_are_unfiltered_at_the_sampling_temperature():
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    tokens, lp = sample(logits, SamplingParams(temperature=0.0), [], PS)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))
    gens = row_generators(range(5))
    tokens, lp = sample(logits, SamplingParams(temperature=0.3, top_k=2, top_p=0.5), gens, PS)
    torch.testing.assert_close(lp, torch.log_softmax(logits / 0.3, -1).gather(1, tokens[:, None]).squeeze(1))
    # not the temperature-1 log-prob: a ratio against it would not start at 1
    assert (lp - torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)).abs().max() > 0.1


def test_same_seed_same_draws_per_row():
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0)
    a, _ = sample(logits, params, row_generators([1, 2, 3, 4]), PS)
    b, _ = sample(logits, params, row_generators([1, 2, 3, 4]), PS)
    c, _ = sample(logits[2:], params, row_generators([3, 4]), PS)  # a row's draw ignores the other rows
    assert a.tolist() == b.tolist() and a[2:].tolist() == c.tolist()


def test_bad_params_are_refused():
    for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ConfigError):
            SamplingParams(**kwargs)
