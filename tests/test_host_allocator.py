"""The host-allocator setting: applied on glibc, skipped on opt-out, and CPU steps stop page-faulting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_seed.host_allocator import ENV_VAR

ROOT = Path(__file__).resolve().parent.parent  # the subprocess imports this checkout, not an installed copy
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

MOE_STEPS = """
import resource, sys, torch
from megatron_seed.host_allocator import keep_freed_memory_in_heap
from megatron_seed.config import ModelConfig, MoEConfig
from megatron_seed.parallel.sharding import init_parameters
from megatron_seed.parallel.state import ParallelState
from moe.layer import MoELayer
print(keep_freed_memory_in_heap())
torch.set_num_threads(1)
ps = ParallelState.single()
layer = MoELayer(ModelConfig(hidden_size=256, moe=MoEConfig(num_experts=16, top_k=4, ffn_size=128)), ps)
init_parameters(layer, 0, ps, 0.02)
x = torch.randn(1, 1024, 256, requires_grad=True)
faults = []
for _ in range(int(sys.argv[1])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _run(env_value: str, steps: int) -> list:
    """(whether the setting was applied, minor page faults of each of ``steps`` MoE steps) in a fresh process."""
    env = {ENV_VAR: env_value, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MOE_STEPS, str(steps)], env=env, capture_output=True, text=True, check=True)
    out = proc.stdout.split("\n")
    return [out[0], [int(v) for v in out[1].split()]]


def test_moe_steps_stop_page_faulting_once_the_heap_is_warm():
    applied, faults = _run("", steps=16)
    assert applied == "True"
    # the first step faults its ~30 MB of activations in (~7500 4 KiB pages); later steps reuse
    # them: most fault in nothing, an occasional one extends the heap by a few MiB. With glibc's
    # defaults most steps fault in 1000-5000 pages here.
    later = sorted(faults[1:])
    assert faults[0] > 1000 and later[len(later) // 2] <= 16, faults


def test_opt_out_keeps_glibc_defaults():
    applied, _ = _run("default", steps=0)  # the setting is what is checked: no steps needed
    assert applied == "False"
