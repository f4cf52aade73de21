"""Memory of one GPU under a layout: model state exactly as this stack allocates it, plus
activations, MoE dispatch buffers, logits, KV cache and a stated framework overhead.

Model state (exact: checked against instantiated models and the ZeRO-1 optimizer):

* parameters: the rank's local shards, counted from :mod:`megatron_seed.params` and split
  the way the layers split them (q/o, dense and shared-expert MLPs, embedding and head over
  tp; k/v over tp, or replicated when tp exceeds the kv heads; norms and router replicated;
  routed experts over ep * etp); first stage adds the embedding, last stage the final norm
  and the head;
* gradients: one per parameter in the parameter's dtype (autograd's ``p.grad``);
* optimizer: :class:`~megatron_seed.train.optimizer.DistributedOptimizer` keeps two buckets,
  dense (sharded over dp * cp) and expert (over edp); under ZeRO-1 a rank holds
  ``ceil(n / size)`` elements of each (fewer on the last ranks) of fp32 master weights, both
  Adam moments and the weight-decay mask: 16 bytes an element;
* optimizer step buffers (transient, activations already freed): the reduced flat fp32
  gradients of both buckets, the ZeRO-1 all-gather of the larger bucket (the gathered
  shards and their concatenation), and Adam's two temporaries over the shard.

Activations (bytes kept for backward, ``b`` bytes an element, ``T`` tokens of a micro-batch
on this cp rank, ``Tl = T / tp`` under sequence parallel, ``N``/``K`` local q/kv heads,
``R = Tl * etp * top_k * imbalance`` expert rows on the busiest rank), per layer:

* every RMSNorm: its input and the fp32 normalised x, ``Tl H (b + 4)``, and ``1/rms``
  (``fused_norm``: ``Tl H b``);
* attention: a norm, the tp-gathered projection input ``T H b`` (``sharded_saved_input``:
  ``Tl H b``, all-gathered again in backward), with QK-norm the same
  norm pair over ``T (N + K) D``, flash attention's q, k, v and output ``T (2N + 2K) D b`` and
  log-sum-exp ``4 T N``;
* MoE: a norm, the router's fp32 input ``4 Tl H`` (``fused_moe``: ``Tl H b``) and fp32 logits and probabilities
  ``8 Tl E``, expert rows ``R H b``, gate/up outputs ``2 R F b``, SwiGLU outputs ``R F b``
  (dropped by selective recompute), the experts' outputs in fp32 ``4 R H`` (the combine's
  ``index_add`` keeps its source; not with ``fused_moe``), shared experts: their input (gathered ``T H b`` under tp;
  at tp = 1 the norm output, shared with the router in fp32) and ``4 T Fs b`` (gate,
  silu(gate), up, product; selective keeps 2);
* dense MLP: a norm, then as the shared experts with the dense ffn;
* per in-flight forward of a chunk: the rotary tables ``8 T D`` and, unless it is the model's
  last chunk, its output ``Tl H b`` (held until its gradient returns); full recompute keeps
  only each layer's input ``Tl H b`` plus one layer's activations while it is recomputed.

In flight (this repo's schedules, :mod:`megatron_seed.parallel.pipeline`): no pipeline, one
micro-batch; 1F1B ``min(pp - r, M)`` micro-batches of stage ``r``; interleaved the chunks
of the warm-up forwards plus one. Transient on top: the busiest layer's dispatch buffers
(the a2a send and receive copies of ``R`` rows and the fp32 ``[Tl, H]`` combine accumulator)
and, on the last stage, the head: final norm, the gathered head input ``T H b`` and the
logits working set ``T V/tp (16 + b)`` (shifted fp32 logits and their exponentials kept for
backward, two fp32 gradients of them and the logits' gradient). KV cache (rollout phase):
``2 x layers x B x L x K D`` in the KV dtype plus the fp32 slot bias ``B x L``, with
``B = rollout_batch / dp``. The rollout generates at the KV dtype (``rollout.dtype``); when that
is not the parameters' dtype it holds a copy of the rank's parameters at it
(:mod:`rl.rollout.precision`, one per trained chunk), counted as ``rollout_weights``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from megatron_seed.config import ModelConfig
from megatron_seed.params import attention_parameters, count_parameters
from megatron_seed.parallel.stages import stage_chunks
from megatron_seed.parallel.state import rank_coordinates
from megatron_seed.plan.inputs import KV_DTYPES, Assumptions, Workload
from megatron_seed.plan.layout import PlanLayout

OPTIMIZER_STATE_BYTES = 16  # fp32 master weight, exp_avg, exp_avg_sq and the weight-decay mask


@dataclass(frozen=True)
class StageParameters:
    """Local parameter elements on one rank of a pipeline stage, by optimizer bucket."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def _layer_parameters(m: ModelConfig, layout: PlanLayout) -> tuple:
    """(dense-MLP layer, MoE layer): local (dense, expert) elements of one transformer layer."""
    counts, attn = count_parameters(m), attention_parameters(m)
    tp = layout.tp
    kv = attn.key_value // tp if m.num_kv_heads % tp == 0 else attn.key_value
    norms = 2 * m.hidden_size
    common = attn.query_output // tp + kv + attn.qk_norm + norms
    moe_layers = m.num_layers - m.num_dense_layers
    dense_layer = common + (counts.dense_mlp // m.num_dense_layers // tp if m.num_dense_layers else 0)
    moe_dense = common + (counts.router + counts.shared_experts // tp) // max(moe_layers, 1)
    moe_expert = counts.experts // max(moe_layers, 1) // (layout.ep * layout.etp)
    return (dense_layer, 0), (moe_dense, moe_expert)


def stage_layers(m: ModelConfig, layout: PlanLayout, pp_rank: int) -> tuple:
    """Layer ids of each model chunk of ``pp_rank`` (as the trainer splits them)."""
    return _stage_layers(m.num_layers, layout.pp, layout.vpp, pp_rank)


@functools.lru_cache(maxsize=4096)
def _stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int) -> tuple:
    return tuple(tuple(chunk) for chunk in stage_chunks(num_layers, pp, vpp, pp_rank))


def stage_layer_kinds(m: ModelConfig, layout: PlanLayout, pp_rank: int) -> tuple:
    """(dense-MLP layers, MoE layers) held by ``pp_rank``."""
    layers = [i for chunk in stage_layers(m, layout, pp_rank) for i in chunk]
    dense = sum(1 for i in layers if i < m.num_dense_layers)
    return dense, len(layers) - dense


def stage_parameters(m: ModelConfig, layout: PlanLayout, pp_rank: int) -> StageParameters:
    dense_layer, moe_layer = _layer_parameters(m, layout)
    n_dense, n_moe = stage_layer_kinds(m, layout, pp_rank)
    dense = n_dense * dense_layer[0] + n_moe * moe_layer[0]
    expert = n_moe * moe_layer[1]
    counts = count_parameters(m)
    table = m.vocab_size * m.hidden_size // layout.tp
    if pp_rank == 0:
        dense += table
    if pp_rank == layout.pp - 1:
        dense += m.hidden_size + counts.value_head  # final norm, value head
        if not (m.tie_embeddings or m.value_head):
            dense += table
    return StageParameters(dense, expert)


def zero1_shard(numel: int, size: int, rank: int) -> int:
    """Elements of a ``numel`` bucket owned by ``rank`` of ``size`` (the optimizer's ranges)."""
    shard = math.ceil(numel / size) if numel else 0
    start = min(numel, shard * rank)
    return min(numel, start + shard) - start


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU by category; ``peak`` is the larger of the step's phases."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    moe_dispatch: float
    logits: float
    optimizer_step: float
    kv_cache: float
    rollout_weights: float
    overhead: float
    in_flight: int  # chunk forwards alive at the peak (1F1B / interleaved)

    @property
    def state(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.overhead

    @property
    def train_peak(self) -> float:
        """Forward/backward (activations alive) or the optimizer step (activations freed)."""
        return self.state + max(self.activations + self.moe_dispatch + self.logits, self.optimizer_step)

    @property
    def rollout_peak(self) -> float:
        return self.state + self.kv_cache + self.rollout_weights

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.rollout_peak)

    def as_dict(self) -> dict:
        return {**asdict(self), "train_peak": self.train_peak, "rollout_peak": self.rollout_peak, "peak": self.peak}


def in_flight_chunks(layout: PlanLayout, micro_batches: int, pp_rank: int) -> list:
    """Chunk index of every forward whose activations are alive at the peak of ``pp_rank``."""
    P, V, M, r = layout.pp, layout.vpp, micro_batches, pp_rank
    if P == 1:
        return [0]
    if V == 1:
        return [0] * min(P - r, M)
    total = M * V
    warmup = total if M == P else min((P - r - 1) * 2 + (V - 1) * P, total)
    alive = warmup + (1 if warmup < total else 0)
    return [(k % (P * V)) // P for k in range(alive)]


class ActivationModel:
    """Bytes of activations per layer for one micro-batch on one rank (see the module docstring)."""

    def __init__(self, m: ModelConfig, layout: PlanLayout, w: Workload, a: Assumptions):
        self.m, self.layout, self.w, self.a = m, layout, w, a
        b, tp = w.act_bytes, layout.tp
        H, D = m.hidden_size, m.head_dim
        T = w.micro_batch * w.seq_len / layout.cp
        Tl = T / tp
        N = m.num_attention_heads / tp
        K = m.num_kv_heads / tp if m.num_kv_heads % tp == 0 else 1
        self.tokens, self.local_tokens = T, Tl
        # an RMSNorm keeps its input, 1/rms and (unless fused) the normalised x in fp32
        norm_bytes = b if a.fused_norm else b + 4
        norm = Tl * H * norm_bytes + 4 * Tl
        gathered = Tl * H * b if a.sharded_saved_input else T * H * b  # the input a column-parallel layer keeps
        self.attention = norm + gathered + T * (2 * N + 2 * K) * D * b + 4 * T * N
        if m.qk_norm:
            self.attention += T * (N + K) * D * norm_bytes + 4 * T * (N + K)
        keep = 2 if w.recompute == "selective" else 4
        self.rows = Tl * layout.etp * m.moe.top_k * a.moe_imbalance
        F = m.moe.ffn_size / layout.etp
        router_bytes = b if a.fused_moe else 4  # ours: the router keeps its input in fp32
        self.moe = (
            norm + Tl * H * router_bytes + 8 * Tl * m.moe.num_experts  # router input, fp32 logits and probabilities
            + self.rows * (H * b + 4 + (2 if w.recompute == "selective" else 3) * F * b)
            + (0.0 if a.fused_moe else self.rows * H * 4)  # ours: the combine's index_add keeps the fp32 expert outputs
        )
        shared = m.moe.num_shared_experts * m.moe.shared_ffn_size / tp
        if shared:
            shared_input = gathered if tp > 1 else (0.0 if router_bytes == b else Tl * H * b)  # tp=1: maybe the router's tensor
            self.moe += shared_input + keep * T * shared * b
        self.dense = norm + gathered + keep * T * (m.dense_ffn_size / tp) * b
        self.rotary = 8 * T * D  # cos and sin tables of the micro-batch, fp32
        self.chunk_output = Tl * H * b  # a stage's output, held until its gradient comes back
        self.dispatch = 2 * self.rows * H * b + 4 * Tl * H if m.num_dense_layers < m.num_layers else 0.0
        head = norm + gathered  # final norm, head input
        # the loss keeps the shifted fp32 logits and their exponentials; its backward adds two fp32
        # gradients of that size and the logits' gradient in the activation dtype
        self.logits = head + (T * (m.vocab_size / tp) * (16 + b) if not m.value_head else 8 * T)

    def layers(self, layer_ids: tuple) -> float:
        """Activations of ``layer_ids`` for one micro-batch without recompute."""
        dense = sum(1 for i in layer_ids if i < self.m.num_dense_layers)
        return len(layer_ids) * self.attention + dense * self.dense + (len(layer_ids) - dense) * self.moe

    def chunk(self, layer_ids: tuple, holds_output: bool) -> float:
        """Activations one forward of a chunk keeps until its backward (``holds_output``: its
        output goes to the next stage and stays referenced until that stage's gradient returns)."""
        if self.w.recompute == "full":
            kept = len(layer_ids) * self.local_tokens * self.m.hidden_size * self.w.act_bytes
        else:
            kept = self.layers(layer_ids)
        return kept + self.rotary + (self.chunk_output if holds_output else 0.0)

    def recompute_working_set(self, layer_ids: tuple) -> float:
        """Full recompute: one layer's activations, rebuilt during its backward."""
        return max(self.layers((i,)) for i in layer_ids) if self.w.recompute == "full" else 0.0


def kv_cache_bytes(m: ModelConfig, layout: PlanLayout, w: Workload, layers: int) -> float:
    if not w.rollout_batch:
        return 0.0
    B, L = w.rollout_batch / layout.dp, w.prompt_len + w.response_len
    K = m.num_kv_heads / layout.tp if m.num_kv_heads % layout.tp == 0 else 1
    return layers * 2 * B * L * K * m.head_dim * KV_DTYPES[w.kv_dtype] + 4 * B * L


def rollout_weight_bytes(total_params: float, w: Workload) -> float:
    """The rollout's copy of this rank's ``total_params`` parameters at the KV dtype; none when it is the parameters'."""
    element = KV_DTYPES[w.kv_dtype]
    return total_params * element if w.rollout_batch and element != w.param_bytes else 0.0


def rank_memory(m: ModelConfig, layout: PlanLayout, w: Workload, a: Assumptions, pp_rank: int,
                dp_rank: int = 0, edp_rank: int = 0) -> MemoryBreakdown:
    """Memory of the rank at (pp_rank, dp * cp rank ``dp_rank``, edp rank ``edp_rank``); rank 0 of a
    ZeRO-1 group holds the largest shard, so the defaults give the worst rank of the stage."""
    params = stage_parameters(m, layout, pp_rank)
    zero = w.zero1
    dense_size, expert_size = layout.dp * layout.cp, layout.edp
    dense_shard = zero1_shard(params.dense, dense_size if zero else 1, dp_rank if zero else 0)
    expert_shard = zero1_shard(params.expert, expert_size if zero else 1, edp_rank if zero else 0)
    step = 4.0 * params.total + 2 * 4 * max(dense_shard, expert_shard)
    gathered = [math.ceil(n / g) * g * 2 * 4 for n, g in ((params.dense, dense_size), (params.expert, expert_size)) if zero and g > 1 and n]
    step += max(gathered, default=0.0)

    acts = ActivationModel(m, layout, w, a)
    chunks = stage_layers(m, layout, pp_rank)
    alive = in_flight_chunks(layout, layout.micro_batches(w), pp_rank)
    last = layout.pp - 1
    per_chunk = [acts.chunk(c, holds_output=not (pp_rank == last and v == len(chunks) - 1)) for v, c in enumerate(chunks)]
    activations = sum(per_chunk[v] for v in alive) + max(acts.recompute_working_set(c) for c in chunks)
    has_moe = any(i >= m.num_dense_layers for c in chunks for i in c)
    layers = sum(len(c) for c in chunks)
    return MemoryBreakdown(
        parameters=params.total * w.param_bytes,
        gradients=params.total * w.param_bytes,
        optimizer=(dense_shard + expert_shard) * OPTIMIZER_STATE_BYTES,
        activations=activations,
        moe_dispatch=acts.dispatch if has_moe else 0.0,
        logits=acts.logits if pp_rank == layout.pp - 1 else 0.0,
        optimizer_step=step,
        kv_cache=kv_cache_bytes(m, layout, w, layers),
        rollout_weights=rollout_weight_bytes(params.total, w),
        overhead=a.framework_overhead_gib * 2**30,
        in_flight=len(alive),
    )


def global_rank_memory(m: ModelConfig, layout: PlanLayout, w: Workload, a: Assumptions, rank: int) -> MemoryBreakdown:
    """:func:`rank_memory` of global ``rank`` (Megatron rank order, :mod:`megatron_seed.parallel.state`)."""
    _, cp, dp, pp = rank_coordinates(rank, [layout.tp, layout.cp, layout.dp, layout.pp])
    _, _, edp, _ = rank_coordinates(rank, [layout.etp, layout.ep, layout.edp, layout.pp])
    return rank_memory(m, layout, w, a, pp, dp_rank=cp + layout.cp * dp, edp_rank=edp)
