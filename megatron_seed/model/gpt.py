"""The GPT-MoE decoder (Qwen3-MoE math; DeepSeek-style shared experts optional).

::

    x = embed(ids)                                   (first pipeline stage)
    for each layer:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    logits = head(norm(x))   or   values = value_head(norm(x))   (last stage)

``mlp`` is a dense SwiGLU for the first ``num_dense_layers`` layers, else the MoE
layer. One stage of a pipeline builds only its layers (``layer_ids``); layers are
named by their global index so initialisation and checkpoints are layout-free.
Logits stay split over the vocabulary (tp); see ``vocab_parallel_log_probs``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from megatron_seed.config import ModelConfig
from megatron_seed.gemm import linear
from megatron_seed.model.attention import Attention, KVCache, build_attention_mask
from megatron_seed.model.layers import RMSNorm, SwiGLUMLP, rotary_cos_sin
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.mappings import gather_from_parallel_region
from megatron_seed.parallel.sharding import init_parameters, set_sharding
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, column_parallel_input
from moe.layer import MoELayer


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_id: int):
        super().__init__()
        sp = ps.sequence_parallel
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, partial_tp_grad=sp)
        self.self_attn = Attention(cfg, ps, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, partial_tp_grad=sp)
        self.is_moe = layer_id >= cfg.num_dense_layers
        self.mlp = MoELayer(cfg, ps) if self.is_moe else SwiGLUMLP(cfg.hidden_size, cfg.dense_ffn_size, ps)
        self.moe_index = layer_id - cfg.num_dense_layers  # this layer's column of recorded routes (``routes_BSLA``)

    def forward(self, x_BSH: torch.Tensor, cos_sin: tuple, mask: Optional[torch.Tensor], cache: Optional[KVCache],
                valid_BS: Optional[torch.Tensor] = None, routes_BSLA: Optional[torch.Tensor] = None,
                compare_routes_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``valid_BS`` (True = real token): MoE layers keep padding out of their balancing statistics;
        ``routes_BSLA`` / ``compare_routes_BS``: recorded routes of every MoE layer (see :class:`GPTModel`)."""
        x_BSH = x_BSH + self.self_attn(self.input_layernorm(x_BSH), cos_sin, mask, cache)
        h_BSH = self.post_attention_layernorm(x_BSH)
        if not self.is_moe:
            return x_BSH + self.mlp(h_BSH)
        routes_BSA = routes_BSLA[:, :, self.moe_index] if routes_BSLA is not None else None
        return x_BSH + self.mlp(h_BSH, valid_BS, routes_BSA, compare_routes_BS)


class ValueHead(nn.Module):
    """Scalar per position: v = w . h + b (critic and reward model)."""

    def __init__(self, hidden_size: int, ps: ParallelState):
        super().__init__()
        self.ps = ps
        self.weight = nn.Parameter(torch.empty(1, hidden_size))
        self.bias = nn.Parameter(torch.empty(1))
        set_sharding(self.weight, (1, hidden_size), partial_tp_grad=ps.sequence_parallel)
        set_sharding(self.bias, (1,), init="zeros", partial_tp_grad=ps.sequence_parallel)

    def forward(self, h_BSH: torch.Tensor) -> torch.Tensor:
        v_BS = linear(h_BSH, self.weight, self.bias).squeeze(-1)
        # every tp rank computes the same loss on the gathered values, so the backward keeps this rank's slice of
        # the gradient (a reduce-scatter would count it tp times)
        return gather_from_parallel_region(v_BS, self.ps.tp_group, 1) if self.ps.sequence_parallel else v_BS


class GPTModel(nn.Module):
    """Decoder stack; on a pipeline stage, holds ``layer_ids`` and the ends it owns."""

    def __init__(
        self,
        cfg: ModelConfig,
        ps: ParallelState,
        layer_ids: Optional[list] = None,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        self.pre_process, self.post_process = pre_process, post_process
        if cfg.tie_embeddings and not (pre_process and post_process):
            raise ValueError("model.tie_embeddings=true needs the embedding and the head on one stage (parallel.pp=1)")
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ps) if pre_process else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, ps, i) for i in self.layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, partial_tp_grad=ps.sequence_parallel) if post_process else None
        self.lm_head = None
        self.value_head = None
        if post_process and cfg.value_head:
            self.value_head = ValueHead(cfg.hidden_size, ps)
        elif post_process and not cfg.tie_embeddings:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, ps)

    def init_weights(self, seed: int) -> None:
        """Same values as the one-process model, whatever the layout (see sharding.py)."""
        init_parameters(self, seed, self.ps, self.cfg.init_std)

    def moe_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def moe_layers_by_column(self) -> dict:
        """``{column of routes_BSLA: MoE layer}`` of this stage's MoE layers."""
        return {layer.moe_index: layer.mlp for layer in self.layers.values() if layer.is_moe}

    def set_routing_replay(self, on: bool) -> None:
        """Routing replay (R3): MoE layers route the tokens given recorded routes by those routes."""
        for m in self.moe_layers():
            m.replay_routes = on

    def set_aux_loss_scale(self, scale: float) -> None:
        """Scale of the MoE aux-loss gradients (1 / micro-batches per step)."""
        for m in self.moe_layers():
            m.aux_loss_scale = scale

    @contextlib.contextmanager
    def fused_projections(self) -> Iterator[None]:
        """Inference only: every attention layer projects q, k, v with one GEMM on a copy of
        its weights made on entry and dropped on exit (see ``Attention.fused_projections``)."""
        with contextlib.ExitStack() as stack:
            for layer in self.layers.values():
                stack.enter_context(layer.self_attn.fused_projections())
            yield

    def allocate_kv_cache(self, batch: int, capacity: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> KVCache:
        """A cache for this stage's layers; ``dtype`` and ``device`` default to the parameters'."""
        attn = next(iter(self.layers.values())).self_attn
        param = next(self.parameters())
        dtype, device = dtype or param.dtype, device or param.device
        return KVCache.allocate(self.layer_ids, batch, attn.num_kv_heads, capacity, attn.head_dim, dtype, device)

    def forward(
        self,
        input_ids_BS: Optional[torch.Tensor] = None,
        hidden_BSH: Optional[torch.Tensor] = None,
        position_ids_BS: Optional[torch.Tensor] = None,
        doc_ids_BS: Optional[torch.Tensor] = None,
        padding_mask_BS: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        advance_cache: bool = True,
        routes_BSLA: Optional[torch.Tensor] = None,
        compare_routes_BS: Optional[torch.Tensor] = None,
        last_position_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B, S, V/tp]`` (or values ``[B, S]``) on the last stage, else hidden states.

        ``input_ids_BS`` on the first stage, ``hidden_BSH`` (this stage's input, sequence-
        sharded under sequence parallel) on the others. ``position_ids_BS`` default to
        0..S-1 (continuing from the cache); ``doc_ids_BS`` keeps attention inside packed
        documents; ``padding_mask_BS`` (True = real token) hides padding from attention and from
        the MoE balancing statistics. Under context parallelism the ``_BS`` inputs of a training forward
        or a prefill are this rank's share of the sequence
        (:func:`~megatron_seed.parallel.context_parallel.is_sharded_forward`); decode steps are
        replicated over cp.
        ``routes_BSLA`` ``[B, S, L, A]`` (``L`` = every MoE layer of the model, ``A`` = top-k; this rank's share
        of the sequence under cp, the whole sequence under sequence parallel): routes recorded by the
        rollout, one-based expert ids (0 = none recorded); each MoE layer compares them with its own
        choice and, under :meth:`set_routing_replay`, routes by them; ``compare_routes_BS`` (True =
        counted) picks the tokens whose disagreement the layers count (``MoELayer.route_counts``).
        ``advance_cache=False`` leaves the cache's cursor for the
        caller to move (``kv_cache.advance(S)``): a compiled decode step must not update the
        cursor's Python int, or torch.compile would trace the step again for every value.
        ``last_position_only``: the last stage applies the final norm and the head to the last
        position alone (``[B, 1, V/tp]``), what a prefill needs, instead of computing logits for
        every prompt position; without sequence parallel only (its positions are split over tp).
        """
        if self.pre_process:
            B, S = input_ids_BS.shape
            device = input_ids_BS.device
        else:
            B, S = hidden_BSH.shape[0], hidden_BSH.shape[1] * (self.ps.tp_size if self.ps.sequence_parallel else 1)
            device = hidden_BSH.device
        cache_S, cache_padding_BS = S, padding_mask_BS  # the slots this forward fills
        if context_parallel.is_sharded_forward(self.ps, S, kv_cache):  # S is this rank's share of the sequence
            if position_ids_BS is None:
                position_ids_BS = context_parallel.local_positions(S, self.ps, device).expand(B, S)
            mask = context_parallel.build_mask(S, self.ps, device, padding_mask_BS, doc_ids_BS)
            if kv_cache is not None:  # a prefill: every cp rank caches the whole prompt
                cache_S = S * self.ps.layout.cp
                cache_padding_BS = context_parallel.gather_sequence(padding_mask_BS, self.ps) if padding_mask_BS is not None else None
        else:
            if position_ids_BS is None:
                start = kv_cache.length if kv_cache is not None else 0
                position_ids_BS = torch.arange(start, start + S, device=device).expand(B, S)
            mask = build_attention_mask(S, device, padding_mask_BS, doc_ids_BS, kv_cache)
        cos_sin = rotary_cos_sin(position_ids_BS, self.cfg.head_dim, self.cfg.rope_theta)
        if kv_cache is not None:
            kv_cache.open_slots(cache_S, cache_padding_BS)
        moe_layers = self.cfg.num_layers - self.cfg.num_dense_layers
        if routes_BSLA is not None and (routes_BSLA.dim() != 4 or routes_BSLA.shape[2] != moe_layers):
            raise ValueError(f"GPTModel: recorded routes of shape {tuple(routes_BSLA.shape)}; expected [B, S, {moe_layers}, top_k] "
                             f"(one column per MoE layer of the model, {moe_layers} here): were they recorded with another model?")
        x_BSH = self.embed_tokens(input_ids_BS) if self.pre_process else hidden_BSH
        for layer in self.layers.values():
            x_BSH = layer(x_BSH, cos_sin, mask, kv_cache, padding_mask_BS, routes_BSLA, compare_routes_BS)
        if kv_cache is not None and advance_cache:
            kv_cache.advance(cache_S)
        if not self.post_process:
            return x_BSH
        if last_position_only:
            if self.ps.sequence_parallel:
                raise ValueError("GPTModel: last_position_only needs sequence parallel off (the last position is on one tp rank)")
            x_BSH = x_BSH[:, -1:]
        h_BSH = self.norm(x_BSH)
        if self.value_head is not None:
            return self.value_head(h_BSH)
        if self.lm_head is not None:
            return self.lm_head(h_BSH)
        return linear(column_parallel_input(h_BSH, self.ps), self.embed_tokens.weight)
