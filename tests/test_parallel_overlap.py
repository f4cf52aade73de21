"""Gradient all-reduce overlapped with backward: starts during backward, same numbers as after it."""
import dataclasses

import pytest
import torch

from megatron_seed.parallel.spawn import run_distributed
from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.optimizer import DistributedOptimizer, model_parameters
from megatron_seed.train.trainer import Trainer, lm_batch, lm_loss_fn, split_microbatches
from tests.parallel_harness import equivalence_config, global_batches

BUCKET = 3000  # elements: several chunks per bucket in the tiny model


def _trainer(ps: ParallelState, overlap: bool) -> Trainer:
    cfg = equivalence_config({})
    cfg.parallel = dataclasses.replace(cfg.parallel, overlap_grad_reduce=False)
    trainer = Trainer(cfg, ps)
    trainer.optimizer = DistributedOptimizer(model_parameters(trainer.chunks), cfg.train, ps, True, overlap, bucket_numel=BUCKET)
    return trainer


def overlap_worker(rank: int, world: int) -> dict:
    ps = ParallelState.build(equivalence_config({}).parallel, world, rank)
    runs = {}
    for overlap in (False, True):
        trainer = _trainer(ps, overlap)
        started = []
        for tokens in global_batches():
            local = lm_batch(tokens[ps.dp_rank * 2:(ps.dp_rank + 1) * 2])
            microbatches = split_microbatches(local, 1)
            trainer.forward_backward(microbatches, lm_loss_fn(ps, float(local["loss_mask_BS"].sum() * ps.dp_size)))
            started.append([(o.launched, len(o.chunks)) for o in trainer.optimizer.overlaps if o is not None])
            trainer.optimizer_step()
        runs[overlap] = {"started": started, "params": [p.detach().clone() for p in model_parameters(trainer.chunks)]}
    identical = all(torch.equal(a, b) for a, b in zip(runs[False]["params"], runs[True]["params"]))
    return {"identical": identical, "started": runs[True]["started"], "sync_started": runs[False]["started"]}


@pytest.mark.timeout(120)
def test_overlapped_reduce_starts_in_backward_and_matches():
    for out in run_distributed(overlap_worker, 2):
        assert out["identical"]
        assert out["sync_started"] == [[], []]
        for step in out["started"]:
            assert len(step) == 2  # dense and expert buckets
            for launched, chunks in step:
                assert chunks > 1 and launched == chunks  # every chunk started before optimizer.step


def extra_pass_worker(rank: int, world: int) -> str:
    ps = ParallelState.build(equivalence_config({}).parallel, world, rank)
    trainer = _trainer(ps, overlap=True)
    microbatches = split_microbatches(lm_batch(global_batches()[0][:2]), 1)
    trainer.optimizer.zero_grad()
    trainer.optimizer.expect_backward_passes(1)  # but two micro-batches run
    loss_fn = lm_loss_fn(ps, 64.0)
    try:
        for mb in microbatches:
            loss_fn(trainer.chunks[0](mb["input_ids_BS"]), mb)[0].backward()
    except RuntimeError as e:
        return str(e)
    finally:
        trainer.optimizer.zero_grad()  # waits for the chunks already in flight
    return "no error"


@pytest.mark.timeout(120)
def test_backward_after_reduce_started_is_an_error():
    for message in run_distributed(extra_pass_worker, 2):
        assert "after its data-parallel all-reduce started" in message and "1 backward passes" in message
