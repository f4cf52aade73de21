"""GPU-only checks (skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine).

A train step on ``cuda`` equals the CPU step in fp32; a bf16 run's loss falls.
"""
import pytest
import torch

from megatron_seed.parallel.state import ParallelState
from megatron_seed.train.trainer import Trainer, lm_batch
from tests.model_utils import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(device: str, precision: str, steps: int) -> tuple:
    cfg = tiny_config(steps=steps, precision=precision)
    trainer = Trainer(cfg, ParallelState.single(device=device))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (4, 17), generator=gen) for _ in range(2)]
    out = [trainer.train_step(lm_batch(data[i % 2]))["loss"] for i in range(steps)]
    params = torch.cat([p.detach().double().cpu().reshape(-1) for m in trainer.chunks for p in m.parameters()])
    return out, params


@pytest.mark.timeout(300)
def test_cuda_step_equals_cpu_step_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_loss, cpu_params = run("cpu", "fp32", 2)
    gpu_loss, gpu_params = run("cuda", "fp32", 2)
    for a, b in zip(gpu_loss, cpu_loss):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert (gpu_params - cpu_params).norm() <= 1e-4 * cpu_params.norm()


@pytest.mark.timeout(300)
def test_bf16_loss_falls_on_cuda():
    losses, _ = run("cuda", "bf16", 25)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.timeout(300)
def test_dry_run_bytes_match_a_cuda_build():
    """What the dry run counts for parameters and optimizer states is what cuda allocates for them
    (the caching allocator rounds each tensor up to 512 bytes)."""
    from megatron_seed.plan.dry_run import dry_run

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    trainer = Trainer(tiny_config(precision="bf16"), ParallelState.single(device="cuda"))
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    tensors = sum(1 for m in trainer.chunks for _ in m.parameters()) + len(trainer.optimizer.state_tensors())
    build = dry_run(tiny_config(precision="bf16"), 1, 0, ()).phases["build"]
    assert abs(held - (build["parameters"] + build["optimizer_states"])) <= 512 * tensors
