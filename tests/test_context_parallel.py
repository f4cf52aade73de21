"""Context parallel equals one process: training steps on packed batches whose documents cross chunk boundaries.

The batch packs documents of uneven lengths into rows of 16 tokens (positions restart
at each document, attention stays inside it, the last row ends in padding), so with
cp=2 (4 chunks of 4 tokens) documents span chunks and ranks. Losses, grad norms and
every updated parameter match the single-process run to rel 1e-5 under cp=2, cp=4,
cp=2 x tp=2 (sequence parallel), cp=2 x pp=2 and cp=2 x ep=2; a plain causal batch
(no masks) takes the lower-right causal path. A sequence length cp does not divide is refused.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_seed.config import ConfigError, validate_config
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer, lm_batch
from tests.parallel_harness import GLOBAL_BATCH, RTOL, SEQ, equivalence_config, full_parameters, rel_err

DOC_LENGTHS = [[5, 7, 4], [3, 9, 4], [16], [6, 6]]  # the last row: 12 tokens then 4 of padding


def packed_batch(step: int) -> dict:
    """Rows of documents packed back to back: doc ids, restarting positions, no loss across documents."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(1, 64, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    doc_ids = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long)
    positions = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long)
    padding = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.bool)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for b, lengths in enumerate(DOC_LENGTHS):
        start = 0
        for d, n in enumerate(lengths):
            doc_ids[b, start:start + n] = d
            positions[b, start:start + n] = torch.arange(n)
            padding[b, start:start + n] = True
            loss_mask[b, start:start + n - 1] = 1.0  # the last token of a document predicts nothing
            start += n
        doc_ids[b, start:] = len(lengths)
    batch = lm_batch(tokens)
    batch.update(doc_ids_BS=doc_ids, position_ids_BS=positions, padding_mask_BS=padding, loss_mask_BS=loss_mask)
    return batch


def train(parallel: dict, ps: ParallelState, packed: bool) -> dict:
    trainer = Trainer(equivalence_config(parallel), ps)
    rows = GLOBAL_BATCH // ps.dp_size
    history = []
    for step in range(2):
        batch = packed_batch(step) if packed else lm_batch(torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1),
                                                                          generator=torch.Generator().manual_seed(step)))
        local = {k: v[ps.dp_rank * rows:(ps.dp_rank + 1) * rows] for k, v in batch.items()}
        metrics = trainer.train_step(local)
        history.append((metrics["loss"], metrics["grad_norm"]))
    return {"history": history, "params": full_parameters(trainer)}


def cp_worker(rank: int, world: int, parallel: dict, packed: bool) -> dict:
    cfg = equivalence_config(parallel)
    return train(parallel, ParallelState.build(cfg.parallel, world, rank), packed)


_REFERENCE: dict = {}


def reference(packed: bool) -> dict:
    if packed not in _REFERENCE:
        _REFERENCE[packed] = train({}, ParallelState.single(), packed)
    return _REFERENCE[packed]


def assert_matches(results: list, ref: dict) -> None:
    seen = set()
    for rank, out in enumerate(results):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(out["history"], ref["history"])):
            assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), f"rank {rank} step {step}: loss {loss} != {ref_loss}"
            assert abs(norm - ref_norm) <= RTOL * abs(ref_norm), f"rank {rank} step {step}: grad norm {norm} != {ref_norm}"
        for name, value in out["params"].items():
            err = rel_err(value, ref["params"][name])
            assert err <= RTOL, f"rank {rank}: {name} differs from one process, relative error {err:.2e}"
            seen.add(name)
    assert seen == set(ref["params"]), f"no rank holds {sorted(set(ref['params']) - seen)}"


LAYOUTS = {
    "cp2": (2, {"cp": 2}),
    "cp4": (4, {"cp": 4}),
    "cp2_tp2_sp": (4, {"cp": 2, "tp": 2, "sequence_parallel": True}),
    "cp2_pp2": (4, {"cp": 2, "pp": 2}),
    "cp2_ep2": (4, {"cp": 2, "ep": 2}),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_training_step_matches_single_process(name):
    world, parallel = LAYOUTS[name]
    assert_matches(run_distributed(cp_worker, world, parallel, True), reference(True))


@pytest.mark.timeout(300)
def test_causal_batch_without_masks_matches_single_process():
    assert_matches(run_distributed(cp_worker, 2, {"cp": 2}, False), reference(False))


def test_packing_changes_the_result():
    """The packed reference is not the plain causal run: the document masks and positions are in force."""
    packed = reference(True)
    batch = packed_batch(0)
    no_docs = {k: v for k, v in batch.items() if k not in ("doc_ids_BS", "position_ids_BS")}
    trainer = Trainer(equivalence_config({}), ParallelState.single())
    loss_without_docs = trainer.train_step(no_docs)["loss"]
    assert abs(loss_without_docs - packed["history"][0][0]) > 1e-4


def test_sequence_not_divisible_by_cp_is_refused():
    cfg = equivalence_config({"cp": 2, "tp": 2})
    cfg.train.seq_len = 20  # 4 chunks of 5 tokens cannot split over tp=2
    with pytest.raises(ConfigError, match=r"train.seq_len=20 is not divisible by 2 x parallel.cp=2 x parallel.tp=2 = 8"):
        validate_config(cfg)
    cfg.train.seq_len = 16
    validate_config(cfg)
    cfg.rl.loss_agg = "sequence"
    with pytest.raises(ConfigError, match="rl.loss_agg='sequence' with parallel.cp=2"):
        validate_config(cfg)


def refusal_worker(rank: int, world: int) -> str:
    ps = ParallelState.build(equivalence_config({"cp": 2}).parallel, world, rank)
    with pytest.raises(ConfigError, match="sequence length 6 is not divisible by 2 x parallel.cp=2 x parallel.tp=1 = 4"):
        context_parallel.shard_microbatch({"input_ids_BS": torch.zeros(1, 6, dtype=torch.long)}, ps)
    return "refused"


@pytest.mark.timeout(240)
def test_batch_not_divisible_by_cp_is_refused():
    assert run_distributed(refusal_worker, 2) == ["refused", "refused"]


def test_zigzag_shards_and_gather_are_inverse():
    """Chunk assignment: rank r holds chunks r and 2cp-1-r; the global order puts the shards back."""
    S, cp = 16, 4
    x = torch.arange(S)[None]
    shards = []
    for r in range(cp):
        ps = ParallelState.single()
        ps.layout = type(ps.layout)(cp, 1, cp, 1, 1, 1, 1, cp)
        ps.group_ranks = {"cp": list(range(cp))}
        ps.rank = r
        shards.append(context_parallel.shard_sequence(x, ps))
        assert context_parallel.local_positions(S // cp, ps, x.device).tolist() == shards[-1][0].tolist()
    assert [s[0].tolist() for s in shards] == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    order = context_parallel._global_order(S, cp, x.device)
    assert torch.cat(shards, dim=1)[0, order].tolist() == list(range(S))
    assert np.array_equal(np.sort(order.numpy()), np.arange(S))
