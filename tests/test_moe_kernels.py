"""Every Triton MoE kernel matches its torch reference under TRITON_INTERPRET=1 on CPU.

The checks live in ``tests/moe_triton_checks.py`` and run in a subprocess: the
interpreter flag must be set before triton is imported, and other tests keep the
normal (compiled) triton.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
@pytest.mark.parametrize("check", ["routing", "permute", "grouped_mm"])
def test_triton_kernel_matches_torch_reference(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "moe_triton_checks.py"), check], env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok {check}" in proc.stdout
