"""What the planner is asked about: the workload, the cluster, and the efficiency assumptions.

Everything here is a plain number a user can change; :func:`check_workload` refuses values
that make no sense, naming the field and the fix (the layout's own checks live in
:mod:`megatron_seed.plan.layout`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_seed.config import ConfigError
from megatron_seed.plan.hardware import GPUSpec

PRECISIONS = ("bf16", "fp8", "fp32")
RECOMPUTE = ("none", "selective", "full")
KV_DTYPES = {"bf16": 2, "fp8": 1, "fp32": 4}


@dataclass(frozen=True)
class Cluster:
    gpu: GPUSpec
    gpus: int
    gpus_per_node: int = 8

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    """One training step (and optionally the RL rollout that precedes it).

    ``precision``: bf16 (bf16 weights, gradients and activations, fp32 master weights and Adam moments),
    fp8 (the same memory, GEMMs at the fp8 peak) or fp32. ``recompute``: none; selective (the
    SwiGLU activations of routed experts, shared experts and dense MLPs are recomputed in
    backward, Megatron's ``--recompute-modules moe_act``; the attention core is flash attention,
    which keeps no S x S scores, so recomputing it would save nothing); full (every layer keeps
    only its input and is recomputed in backward). ``rollout_batch`` sequences of
    ``prompt_len + response_len`` tokens are generated per step by the whole job (0 = no rollout).
    """

    seq_len: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int = 1
    precision: str = "bf16"
    recompute: str = "none"
    zero1: bool = True
    overlap_grad_reduce: bool = True
    rollout_batch: int = 0
    prompt_len: int = 0
    response_len: int = 0
    kv_dtype: str = "bf16"

    @property
    def param_bytes(self) -> int:
        """Bytes per parameter element (and per gradient element: autograd keeps the parameter dtype)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Assumptions:
    """Efficiencies and overlaps the time and memory model assume (printed with every plan).

    Defaults describe this stack as it is: no tp-communication overlap, the ep all-to-all not
    overlapped (the dispatcher's hooks are split for it, nothing overlaps yet), the dp
    gradient all-reduce overlapped with the last micro-batch's backward only, the ZeRO-1
    parameter all-gather exposed.
    """

    gemm_efficiency: float = 0.6  # achieved fraction of peak by the dense (tp-split) GEMMs
    expert_gemm_efficiency: float = 0.5  # by the grouped expert GEMMs
    attention_efficiency: float = 0.4  # by the flash-attention core (fwd + bwd)
    comm_efficiency: float = 0.7  # fraction of link bandwidth a collective reaches
    moe_imbalance: float = 1.2  # rows on the busiest expert rank / mean rows (compute, a2a and buffers)
    overlap_tp: float = 0.0  # fraction of tp collectives hidden behind compute
    overlap_ep: float = 0.0  # fraction of ep all-to-all hidden behind compute
    overlap_pp: float = 0.0  # fraction of pipeline send/recv hidden behind compute
    overlap_param_gather: float = 0.0  # fraction of the ZeRO-1 parameter all-gather hidden behind the next forward
    ep_node_dedup: float = 0.0  # 1: a token crosses to each remote node once, then NVLink (DeepEP); 0: every row crosses (ours)
    fused_norm: float = 0.0  # 1: RMSNorm keeps its input and 1/rms only (TE); 0: also the fp32 normalised x (ours)
    sharded_saved_input: float = 0.0  # 1: tp layers keep their sequence shard and all-gather it again in backward (Megatron)
    fused_moe: float = 0.0  # 1: no fp32 copies of the router input and of the expert outputs kept (Megatron's fused unpermute)
    framework_overhead_gib: float = 5.0  # CUDA context, NCCL buffers, allocator fragmentation, workspace

    @classmethod
    def profile(cls, name: str) -> "Assumptions":
        """``ours`` (this stack today) or ``megatron-core`` (its published MoE runs: tp-communication
        overlap, 1F1B all-to-all overlap, DeepEP dispatch, overlapped parameter gather, Transformer
        Engine's fused norms, sequence-parallel inputs re-gathered in backward, fused MoE unpermute)."""
        if name not in PROFILES:
            raise ConfigError(f"--stack {name!r}: unknown; choose one of {', '.join(PROFILES)}")
        return PROFILES[name]

    def replace(self, items: list) -> "Assumptions":
        """A copy with ``name=value`` items applied (``--assume``)."""
        names = [f.name for f in dataclasses.fields(self)]
        changes = {}
        for item in items:
            name, _, raw = item.partition("=")
            if name not in names or not raw:
                raise ConfigError(f"--assume {item!r}: expected NAME=NUMBER with NAME one of {', '.join(names)}")
            try:
                changes[name] = float(raw)
            except ValueError:
                raise ConfigError(f"--assume {item!r}: {raw!r} is not a number") from None
        out = dataclasses.replace(self, **changes)
        check_assumptions(out)
        return out


def check_assumptions(a: Assumptions) -> None:
    for name in ("gemm_efficiency", "expert_gemm_efficiency", "attention_efficiency", "comm_efficiency"):
        value = getattr(a, name)
        if not 0 < value <= 1:
            raise ConfigError(f"--assume {name}={value}: must be in (0, 1]")
    for name in ("ep_node_dedup", "fused_norm", "sharded_saved_input", "fused_moe"):
        if getattr(a, name) not in (0.0, 1.0):
            raise ConfigError(f"--assume {name}={getattr(a, name)}: must be 0 (this stack) or 1 (Megatron-core's way)")
    for name in ("overlap_tp", "overlap_ep", "overlap_pp", "overlap_param_gather"):
        value = getattr(a, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"--assume {name}={value}: must be in [0, 1]")
    if a.moe_imbalance < 1:
        raise ConfigError(f"--assume moe_imbalance={a.moe_imbalance}: must be >= 1 (1 = perfectly balanced experts)")
    if a.framework_overhead_gib < 0:
        raise ConfigError(f"--assume framework_overhead_gib={a.framework_overhead_gib}: must be >= 0")


def check_workload(w: Workload, c: Cluster, max_seq_len: int) -> None:
    for name in ("seq_len", "global_batch", "micro_batch"):
        if getattr(w, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(w, name)}: must be > 0")
    if w.seq_len > max_seq_len:
        raise ConfigError(f"--seq-len={w.seq_len} exceeds model.max_seq_len={max_seq_len}; fix: shorten it or --set model.max_seq_len={w.seq_len}")
    if w.precision not in PRECISIONS:
        raise ConfigError(f"--precision={w.precision!r}: must be one of {', '.join(PRECISIONS)}")
    if w.recompute not in RECOMPUTE:
        raise ConfigError(f"--recompute={w.recompute!r}: must be one of {', '.join(RECOMPUTE)}")
    if w.kv_dtype not in KV_DTYPES:
        raise ConfigError(f"--kv-dtype={w.kv_dtype!r}: must be one of {', '.join(KV_DTYPES)}")
    if w.rollout_batch < 0 or w.prompt_len < 0 or w.response_len < 0:
        raise ConfigError("--rollout-batch / --prompt-len / --response-len must be >= 0")
    if w.rollout_batch and w.prompt_len + w.response_len <= 0:
        raise ConfigError(f"--rollout-batch={w.rollout_batch} needs --prompt-len and/or --response-len > 0")
    if c.gpus <= 0 or c.gpus_per_node <= 0:
        raise ConfigError(f"--gpus={c.gpus} / --gpus-per-node={c.gpus_per_node}: must be > 0")
    if c.gpus > c.gpus_per_node and c.gpus % c.gpus_per_node:
        raise ConfigError(f"--gpus={c.gpus} is not a whole number of {c.gpus_per_node}-GPU nodes; "
                          f"fix: use a multiple of {c.gpus_per_node} or change --gpus-per-node")


PROFILES = {
    "ours": Assumptions(),
    "megatron-core": Assumptions(overlap_tp=0.9, overlap_ep=0.9, overlap_pp=0.9, overlap_param_gather=0.9, ep_node_dedup=1.0,
                                 fused_norm=1.0, sharded_saved_input=1.0, fused_moe=1.0),
}
