"""Step time of a layout: FLOPs over an achievable fraction of peak, plus the collectives.

Per micro-batch on each pipeline stage (the slowest stage sets the pace):

* compute: forward FLOPs per rank (q/k/v/o, dense and shared-expert MLPs, router and logits
  over tp; flash-attention core ``2 S N D`` a token and layer over tp; routed experts
  ``6 H F top_k`` a token over the rank's share of tokens, times the MoE imbalance on the
  busiest rank); backward = 2 x forward; full recompute adds one forward of the layers.
  Dense GEMMs, grouped expert GEMMs and the attention core each run at their own fraction of
  the GPU's peak (``Assumptions``);
* tp (sequence parallel): per layer an all-gather before and a reduce-scatter after the
  attention, the dense MLP and the shared experts, ``(tp-1)/tp x T H b`` bytes each, forward
  and backward, over NVLink (tp stays within a node); etp: the token all-gather and output
  reduce-scatter of each MoE layer;
* ep: four all-to-alls per MoE layer (dispatch and combine, forward and backward) of the busiest
  rank's expert rows ``R (H b + 4)`` bytes; the share of peers on the same node goes over
  NVLink, the rest over the inter-node network, concurrently;
* cp: the all-gather of each layer's keys and values (and the reduce-scatter of their
  gradients); pp: each chunk's activation and gradient send, over the inter-node network
  unless neighbouring stages share a node.

Step = micro-batches x the slowest stage's micro-batch time, plus the pipeline bubble
``(pp-1)/(M vpp)`` of it, plus data parallel: the fp32 gradient all-reduce of both buckets
(overlapped with the last micro-batch's backward when ``overlap_grad_reduce``), the ZeRO-1
fp32 parameter all-gather (exposed) and the Adam update (HBM-bound). MFU counts model FLOPs
(:func:`megatron_seed.train.metrics.flops_per_token`, as the trainer logs it) against the
bf16 peak of every GPU.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megatron_seed.config import ModelConfig
from megatron_seed.params import attention_parameters, count_parameters
from megatron_seed.plan.inputs import Assumptions, Cluster, Workload
from megatron_seed.plan.layout import PlanLayout
from megatron_seed.plan.memory import stage_layer_kinds, stage_parameters, zero1_shard
from megatron_seed.train.metrics import flops_per_token


@dataclass(frozen=True)
class StageFlops:
    """Forward FLOPs of one micro-batch on one rank of a stage, by the kernel that runs them."""

    dense: float
    experts: float
    attention_core: float

    @property
    def total(self) -> float:
        return self.dense + self.experts + self.attention_core


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step by component (the slowest stage's), and the throughput."""

    compute: float
    tp_comm: float
    ep_comm: float
    cp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float
    optimizer: float
    step: float
    tokens_per_s_per_gpu: float
    mfu: float
    slowest_stage: int

    def as_dict(self) -> dict:
        return asdict(self)


def stage_flops(m: ModelConfig, layout: PlanLayout, w: Workload, pp_rank: int, imbalance: float = 1.0) -> StageFlops:
    counts, attn = count_parameters(m), attention_parameters(m)
    tp = layout.tp
    T = w.micro_batch * w.seq_len / layout.cp
    Tl = T / tp
    kv = attn.key_value / tp if m.num_kv_heads % tp == 0 else attn.key_value / m.num_kv_heads  # replicated: one kv head each
    moe_layers = max(m.num_layers - m.num_dense_layers, 1)
    per_attention = 2 * T * (attn.query_output / tp + kv)
    per_core = 2 * T * w.seq_len * m.num_attention_heads * m.head_dim / tp
    per_dense_mlp = 2 * T * counts.dense_mlp / max(m.num_dense_layers, 1) / tp
    per_moe_dense = 2 * Tl * counts.router / moe_layers + 2 * T * counts.shared_experts / moe_layers / tp
    per_experts = 2 * Tl * counts.activated_experts / moe_layers * imbalance
    n_dense, n_moe = stage_layer_kinds(m, layout, pp_rank)
    core = (n_dense + n_moe) * per_core
    dense = (n_dense + n_moe) * per_attention + n_dense * per_dense_mlp + n_moe * per_moe_dense
    experts = n_moe * per_experts
    if pp_rank == layout.pp - 1 and not m.value_head:
        dense += 2 * T * m.vocab_size * m.hidden_size / tp
    return StageFlops(dense, experts, core)


def _remote_node_share(m: ModelConfig, layout: PlanLayout, c: Cluster, dedup: bool) -> float:
    """Bytes crossing nodes per row-byte: rows to experts on other nodes, or (``dedup``) one copy a
    token per remote node its top-k touches, ``nodes' (1 - C(E - E/n, k) / C(E, k)) / k`` a row."""
    ep = layout.ep
    peers_in_node = min(ep, max(1, c.gpus_per_node // layout.etp))
    nodes = ep // peers_in_node
    if not dedup:
        return (ep - peers_in_node) / ep
    E, k = m.moe.num_experts, m.moe.top_k
    per_node = E // nodes
    miss = math.comb(E - per_node, k) / math.comb(E, k)
    return (nodes - 1) * (1 - miss) / k


def _all_to_all_seconds(volume: float, m: ModelConfig, layout: PlanLayout, c: Cluster, a: Assumptions) -> float:
    """One all-to-all over ep of ``volume`` bytes of rows a rank (its own share stays put);
    NVLink and the inter-node network carry their shares at once."""
    ep, eff = layout.ep, a.comm_efficiency
    peers_in_node = min(ep, max(1, c.gpus_per_node // layout.etp))
    intra = volume * (peers_in_node - 1) / ep / (c.gpu.nvlink_gbps * 1e9 * eff)
    inter = volume * _remote_node_share(m, layout, c, a.ep_node_dedup > 0) / (c.gpu.internode_gbps * 1e9 * eff)
    return max(intra, inter)


def _bandwidth(span: int, c: Cluster, eff: float) -> float:
    """Bytes/s of a collective among ``span`` consecutive ranks (NVLink inside a node)."""
    return (c.gpu.nvlink_gbps if span <= c.gpus_per_node else c.gpu.internode_gbps) * 1e9 * eff


def micro_batch_seconds(m: ModelConfig, layout: PlanLayout, w: Workload, c: Cluster, a: Assumptions, pp_rank: int) -> dict:
    """Forward + backward of one micro-batch on ``pp_rank``: compute and exposed communication, seconds."""
    peak = c.gpu.peak_flops(w.precision)
    flops = stage_flops(m, layout, w, pp_rank, a.moe_imbalance)
    passes = 3.0 + (1.0 if w.recompute == "full" else 0.0)  # forward, backward (2x), recomputed forward
    compute = passes * (flops.dense / a.gemm_efficiency + flops.experts / a.expert_gemm_efficiency
                        + flops.attention_core / a.attention_efficiency) / peak
    if pp_rank == layout.pp - 1 and not m.value_head and w.recompute == "full":  # the head is not recomputed
        compute -= 2 * w.micro_batch * w.seq_len / layout.cp * m.vocab_size * m.hidden_size / layout.tp / (a.gemm_efficiency * peak)

    b, tp, eff = w.act_bytes, layout.tp, a.comm_efficiency
    T = w.micro_batch * w.seq_len / layout.cp
    Tl = T / tp
    n_dense, n_moe = stage_layer_kinds(m, layout, pp_rank)
    n_layers = n_dense + n_moe
    comm_passes = 2.0 + (1.0 if w.recompute == "full" else 0.0)
    mlp_colls = 2 * n_dense + (2 * n_moe if m.moe.num_shared_experts else 0)  # routed experts: none (tokens stay split)
    tp_colls = 2 * n_layers + mlp_colls + (pp_rank == 0) + (pp_rank == layout.pp - 1)  # + embedding RS, head AG
    tp_bytes = (tp - 1) / tp * T * m.hidden_size * b
    gathers = (tp_colls - (pp_rank == 0)) / 2  # the all-gathers among them (the embedding's is a reduce-scatter)
    regather = gathers if a.sharded_saved_input else 0.0  # backward all-gathers the kept shards again
    tp_time = (comm_passes * tp_colls + regather) * tp_bytes / (c.gpu.nvlink_gbps * 1e9 * eff) if tp > 1 else 0.0
    rows = Tl * layout.etp * m.moe.top_k * a.moe_imbalance
    ep_time = 0.0
    if n_moe and layout.ep > 1:
        ep_time += comm_passes * 2 * n_moe * _all_to_all_seconds(rows * (m.hidden_size * b + 4), m, layout, c, a)
    if n_moe and layout.etp > 1:
        etp_bytes = (layout.etp - 1) / layout.etp * Tl * layout.etp * m.hidden_size * b
        tp_time += comm_passes * 2 * n_moe * etp_bytes / (c.gpu.nvlink_gbps * 1e9 * eff)
    cp_time = 0.0
    if layout.cp > 1:
        K = m.num_kv_heads / tp if m.num_kv_heads % tp == 0 else 1
        kv_bytes = (layout.cp - 1) * T * 2 * K * m.head_dim * b
        cp_time = comm_passes * n_layers * kv_bytes / _bandwidth(tp * layout.cp, c, eff)
    pp_time = 0.0
    if layout.pp > 1:
        sends = 2 * layout.vpp  # each chunk: activation forward, gradient backward
        pp_time = sends * Tl * m.hidden_size * b / _bandwidth(layout.tp * layout.cp * layout.dp * 2, c, eff)
    # Overlap: a fraction of each collective may run concurrently with compute, but no more of
    # it can hide than there is compute left to hide behind (taken in this order).
    exposed, budget = {"compute": compute}, compute
    for name, seconds, overlap in (("ep_comm", ep_time, a.overlap_ep), ("tp_comm", tp_time, a.overlap_tp),
                                   ("cp_comm", cp_time, a.overlap_tp), ("pp_comm", pp_time, a.overlap_pp)):
        hidden = min(seconds * overlap, budget)
        budget -= hidden
        exposed[name] = seconds - hidden
    return exposed


def step_time(m: ModelConfig, layout: PlanLayout, w: Workload, c: Cluster, a: Assumptions) -> StepTime:
    stages = [micro_batch_seconds(m, layout, w, c, a, r) for r in range(layout.pp)]
    slowest = max(range(layout.pp), key=lambda r: sum(stages[r].values()))
    per_mb = stages[slowest]
    t_mb = sum(per_mb.values())
    M = layout.micro_batches(w)
    bubble = (layout.pp - 1) / layout.vpp * t_mb

    eff = a.comm_efficiency
    params = [stage_parameters(m, layout, r) for r in range(layout.pp)]
    dp_time = optimizer = 0.0
    stage_span = layout.tp * layout.cp * layout.dp
    for p in params:  # every stage reduces at once; the slowest stage's reduction counts
        t = hidden_budget = 0.0
        shards = 0
        for numel, group in ((p.dense, layout.dp * layout.cp), (p.expert, layout.edp)):
            shard = zero1_shard(numel, group if w.zero1 else 1, 0)
            shards += shard
            if group > 1 and numel:
                all_reduce = 2 * (group - 1) / group * 4 * numel / _bandwidth(stage_span, c, eff)
                gather = (group - 1) / group * 4 * numel / _bandwidth(stage_span, c, eff) * (1 - a.overlap_param_gather) if w.zero1 else 0.0
                t += all_reduce + gather
                hidden_budget += all_reduce
        if w.overlap_grad_reduce:
            t -= min(hidden_budget, per_mb["compute"] * 2 / 3)  # the last backward
        dp_time = max(dp_time, t)
        optimizer = max(optimizer, (28 * shards + 12 * p.total) / (c.gpu.hbm_gbps * 1e9))
    step = M * t_mb + bubble + dp_time + optimizer
    tokens = w.global_batch * w.seq_len
    model_flops = flops_per_token(m, w.seq_len) * tokens
    return StepTime(
        compute=M * per_mb["compute"], tp_comm=M * per_mb["tp_comm"], ep_comm=M * per_mb["ep_comm"],
        cp_comm=M * per_mb["cp_comm"], pp_comm=M * per_mb["pp_comm"], bubble=bubble, dp_comm=dp_time,
        optimizer=optimizer, step=step, tokens_per_s_per_gpu=tokens / step / c.gpus,
        mfu=model_flops / (step * c.gpus * c.gpu.peak_flops("bf16")), slowest_stage=slowest,
    )
