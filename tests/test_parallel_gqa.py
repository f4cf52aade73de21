"""tp larger than the kv-head count: kv projections replicated, their gradients summed over tp."""
import pytest

from megatron_seed.parallel.spawn import run_distributed
from tests.parallel_harness import assert_matches_reference, train_worker


@pytest.mark.timeout(240)
def test_tp4_with_two_kv_heads_matches_single_process():
    # tiny model: 4 query heads, 2 kv heads -> each kv head serves two tp ranks
    assert_matches_reference(run_distributed(train_worker, 4, {"tp": 4}))
