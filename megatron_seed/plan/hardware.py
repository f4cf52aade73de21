"""The GPU table the planner reads: capacity, peak FLOP/s, HBM and interconnect bandwidth.

The table is a YAML file (``megatron_seed/plan/gpus.yaml`` by default, or any file given
with ``--gpu-table``): one mapping per GPU name with the fields of :class:`GPUSpec`.
Bandwidths are per GPU and per direction, in GB/s (1e9 bytes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megatron_seed.config import ConfigError

DEFAULT_TABLE = Path(__file__).resolve().parent / "gpus.yaml"
GIB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    description: str
    memory_gib: float
    peak_tflops_bf16: float
    peak_tflops_fp8: float
    hbm_gbps: float
    nvlink_gbps: float
    internode_gbps: float

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s of the GEMMs at ``precision`` (fp32 runs on the bf16 tensor cores as TF32: half)."""
        tflops = {"bf16": self.peak_tflops_bf16, "fp8": self.peak_tflops_fp8, "fp32": self.peak_tflops_bf16 / 2}[precision]
        return tflops * 1e12


def load_gpu_table(path: Optional[str] = None) -> dict:
    """GPU name (lower case) -> :class:`GPUSpec`, from ``path`` or the bundled table."""
    source = Path(path) if path else DEFAULT_TABLE
    if not source.exists():
        raise ConfigError(f"--gpu-table {source}: no such file; fix: give a YAML file shaped like {DEFAULT_TABLE}")
    with open(source) as f:
        data = yaml.safe_load(f) or {}
    fields = [f.name for f in dataclasses.fields(GPUSpec) if f.name != "name"]
    table = {}
    for name, entry in data.items():
        missing = [k for k in fields if k not in (entry or {})]
        unknown = [k for k in (entry or {}) if k not in fields]
        if missing or unknown:
            raise ConfigError(f"{source}: GPU {name!r} has missing fields {missing} / unknown fields {unknown}; "
                              f"fix: give exactly {', '.join(fields)}")
        table[str(name).lower()] = GPUSpec(name=str(name).lower(), **entry)
    return table


def get_gpu(name: str, path: Optional[str] = None) -> GPUSpec:
    table = load_gpu_table(path)
    spec = table.get(name.lower())
    if spec is None:
        raise ConfigError(f"--gpu {name!r}: unknown GPU; known: {', '.join(sorted(table))}; "
                          f"fix: pick one of them or add an entry to {path or DEFAULT_TABLE} (or a file passed with --gpu-table)")
    return spec
