"""In-process rollout engine: batched KV-cache generation on the training model (colocated).

The engine runs the model being trained, on its own parallel groups, so no weights are
copied. One ``generate`` call:

1. expands every prompt into ``n`` rows (samples), each with its own seeded generator
   (see :mod:`rl.rollout.sampling`), and sorts rows by prompt length;
2. splits the rows into chunks whose KV cache fits ``rollout.kv_cache_budget_mb``
   (policy + critic caches, ``2 * layers * kv_heads * (P + max_new) * head_dim`` floats a
   row), so a batch that does not fit is generated in several chunks instead of crashing;
3. per chunk: one prefill of the left-padded prompts (positions restart at 0 at each
   prompt's first real token; the cache's ``bias_BL`` hides the padding), then one decode step per
   token. A row ends at a stop token (``"stop"``, the stop token is part of the response)
   or after ``max_new_tokens`` (``"length"``); finished rows leave the batch at once and
   the cache is compacted with ``KVCache.select``, so later steps only compute live rows;
4. returns a :class:`~rl.rollout.outputs.RolloutBatch` with tokens, behaviour log-probs,
   masks, finish reasons, (with a critic) values and (with an MoE policy) the routes every MoE
   layer chose for every token it was fed (:mod:`rl.rollout.routes`), rows in prompt order.

Parallel layouts (all dp ranks generate their own prompts, see :func:`local_prompts`):

* tp: every tp rank holds the same rows; logits stay vocab-sharded and sampling needs no
  gather except for top-k / top-p. Sequence parallel is switched off while generating
  (decode steps have ``S = 1``, which cannot be split over tp): the math is the same,
  activations are simply replicated over tp instead of sharded. Prefills are left-padded
  to a multiple of tp so the MoE layer can still split their tokens over tp.
* cp: each prefill is cut like a training sequence (zig-zag chunks, widths a multiple of
  ``2 cp tp``) and attends over K/V all-gathered over cp, which every cp rank writes to its
  cache whole; rank 0 holds the prompt's last position and broadcasts its logits. Decode
  steps run replicated over cp (every cp rank has the same rows and seeds), as at cp=1.
* ep (and etp): the token dispatcher's all-to-alls need every rank of the expert group
  in every forward, yet ranks finish their own prompts at different times. Each
  iteration every rank runs exactly one forward (a prefill, a decode step, or a one-token
  dummy once its own work is done) and an all-reduce (MAX) of a "still working" flag
  over the world decides whether anyone needs another iteration.
* pp: micro-batched decoding written here (the training schedules in
  ``parallel/pipeline.py`` keep no KV cache). The rows are cut into chunks and ``pp``
  of them (micro-batches, each with its own cache) are in flight at once, visited in a
  fixed round-robin order by every stage. Activations ``[b, S, H]`` go stage to stage
  with send/recv; the last stage samples and sends the ``(tokens, log-probs, values)``
  packet back to every other stage without waiting; a stage only waits for a
  micro-batch's packet when that micro-batch comes round again, so while the last stage
  samples micro-batch ``m`` the first stage already runs ``m + 1``. Every stage applies
  the same packets in the same order, so all agree on which rows ended and which chunk
  fills a freed slot. ``virtual_pp`` must be 1.

Compiled decoding (``rollout.compile``): on one process per replica (tp = pp = ep = etp = cp
= 1) the decode step (one token per row: the model forward on the cache, without moving
its cursor) runs through ``torch.compile``, so norms, RoPE, the attention softmax, the
router and the residual adds fuse into a few kernels, and the per-op dispatch and Python
overhead of ~100 small ops a step goes away. The generated code that calls the kernels is
C++ too (inductor's ``cpp_wrapper``). Prefills stay eager. No step may bring a
new constant into the trace, or torch.compile would retrace it every token: the batch
size and the cache capacity are marked dynamic before the first trace (rows leaving the
batch and chunks of other widths reuse the graph; a batch of one row is specialised by
torch and gets its own), and the cache's fill length, the one size that grows per
token, turns symbolic at the second step through torch's automatic dynamic shapes. So a
run compiles two graphs per model, three once a single row is left. Layouts with
collectives inside the step, or a CPU without a C++ compiler, decode eagerly (a warning
says so).

Precision (``rollout.dtype``): generation runs the trained chunks themselves when they have that
dtype (always under ``auto``, the default), else copies of them at it (:mod:`rl.rollout.precision`: built once, refreshed in place at
the start of every ``generate`` call, KV caches in the copy's dtype); sampling is fp32 on the
logits either way. ``samples_with_trained_weights`` tells the trainer whether the behaviour
log-probs are the training forward's or must be recomputed.

Critic values ride in the same structure: the critic has its own cache and runs the same
forwards on the same inputs; its output at the last input position is the value of the
state that the next sampled token is drawn from.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_seed.config import ConfigError, RolloutConfig
from megatron_seed.model.attention import KVCache
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.state import ParallelState
from rl.rollout.outputs import FINISH_LENGTH, FINISH_STOP, RolloutBatch, assemble
from rl.rollout.precision import ROLLOUT_DTYPES, SamplingWeights
from rl.rollout.routes import RouteRecorder
from rl.rollout.sampling import SamplingParams, row_generators, row_seed, sample

ModelArg = Union[GPTModel, Sequence[GPTModel]]
ACTIVATION_TAG, PACKET_TAG = 0, 1  # pp messages: activations flow forward, sampled-token packets flow back


def local_prompts(prompts: Sequence, ps: ParallelState) -> list:
    """This dp rank's share of a global prompt list (round robin), so dp ranks never repeat work."""
    return list(prompts[ps.dp_rank::ps.dp_size])


def _one_chunk(model: Optional[ModelArg], what: str) -> Optional[GPTModel]:
    if model is None or isinstance(model, GPTModel):
        return model
    chunks = list(model)
    if len(chunks) != 1:
        raise ConfigError(f"rollout: the {what} has {len(chunks)} model chunks on this rank; generation needs parallel.virtual_pp=1")
    return chunks[0]


@contextlib.contextmanager
def generation_mode(models: Sequence[GPTModel], ps: ParallelState) -> Iterator[None]:
    """``torch.inference_mode`` (no autograd bookkeeping at all: ~10% less per-op overhead than
    ``no_grad`` at decode sizes), eval mode (routers neither count load for bias balancing nor
    compute balancing losses), sequence parallel off, MoE layers keeping whole-sequence routes
    (``MoELayer.gather_routes``), and q/k/v projected by one GEMM on
    weights concatenated for this generation (``GPTModel.fused_projections``)."""
    training = [m.training for m in models]
    sequence_parallel = ps.sequence_parallel
    ps.sequence_parallel = False
    moe_layers = [layer for m in models for layer in m.moe_layers()]
    for m in models:
        m.eval()
    for layer in moe_layers:  # the rollout records whole-sequence routes (rl.rollout.routes)
        layer.gather_routes = True
    try:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for m in models:
                stack.enter_context(m.fused_projections())
            yield
    finally:
        ps.sequence_parallel = sequence_parallel
        for m, t in zip(models, training):
            m.train(t)
        for layer in moe_layers:
            layer.gather_routes = False


def _decode_forward(model: GPTModel, ids_B1: torch.Tensor, pos_B1: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits ``[B, V]`` of one decode step; the caller advances the cache (what ``torch.compile`` traces)."""
    return model(ids_B1, position_ids_BS=pos_B1, kv_cache=cache, advance_cache=False)[:, -1]


def _mark_dynamic_sizes(cache: KVCache) -> None:
    """Have torch.compile trace the batch size and the capacity of ``cache`` as symbols from the
    first compilation, so rows leaving the batch and chunks of other widths reuse its graph
    (``maybe``: a size of 1 is still specialised, without an error)."""
    torch._dynamo.maybe_mark_dynamic(cache.bias_BL, 0)
    torch._dynamo.maybe_mark_dynamic(cache.bias_BL, 1)
    for k_BKDL, v_BKLD in zip(cache.k.values(), cache.v.values()):
        for tensor, capacity_dim in ((k_BKDL, 3), (v_BKLD, 2)):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, capacity_dim)


def compile_blocker(ps: ParallelState, device: torch.device) -> Optional[str]:
    """Why the decode step cannot be compiled under this layout on this device, or None when it can."""
    split = {name: ps.size(name) for name in ("tp", "pp", "ep", "etp", "cp") if ps.size(name) > 1}
    if split:
        layout = ", ".join(f"{name}={size}" for name, size in split.items())
        return f"the decode step of {layout} runs collectives (send/recv, all-reduce, all-to-all) that torch.compile cannot trace"
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in (os.environ.get("CXX"), "g++", "clang++") if cxx):
        return "torch.compile on CPU needs a C++ compiler ($CXX, g++ or clang++) and none was found"
    return None


def kv_bytes_per_slot(model: GPTModel) -> int:
    """Bytes one cache slot of one row takes on this rank: k and v of every local layer + the slot's attention bias."""
    attn = next(iter(model.layers.values())).self_attn
    element = next(model.parameters()).element_size()
    return (2 * len(model.layer_ids) * attn.num_kv_heads * attn.head_dim + 1) * element


@dataclass
class _Chunk:
    """Rows generated together: one prefill, then decode steps until every row has ended."""

    rows: list  # global row ids still running, in batch order
    prompts: list  # their prompt ids
    width: int  # prefill columns (longest prompt, rounded up to a multiple of tp, of 2 cp tp under cp)
    generators: list = field(default_factory=list)
    cache: Optional[KVCache] = None
    critic_cache: Optional[KVCache] = None
    steps: int = 0  # tokens generated so far by every running row
    prompt_lens_B: Optional[torch.Tensor] = None
    next_ids_B: Optional[torch.Tensor] = None


@dataclass
class _Results:
    tokens: dict = field(default_factory=dict)
    log_probs: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    finish: dict = field(default_factory=dict)

    def add(self, row: int, token: int, log_prob: float, value: float) -> None:
        self.tokens.setdefault(row, []).append(token)
        self.log_probs.setdefault(row, []).append(log_prob)
        self.values.setdefault(row, []).append(value)


class RolloutEngine:
    """Generates with ``policy`` (and optionally scores with ``critic``) on their parallel groups.

    ``policy`` / ``critic``: this rank's model (or its one-element chunk list); the critic
    must have ``value_head=True`` and the same layout. ``stop_ids``: tokens that end a
    response (eos, end of turn); with a ``tokenizer`` they default to its chat template's.
    ``seed`` seeds the engine's generator: the same seed, prompts and weights give the
    same rollouts, whatever the chunking.
    """

    def __init__(
        self,
        policy: ModelArg,
        ps: ParallelState,
        cfg: Optional[RolloutConfig] = None,
        *,
        stop_ids: Optional[Sequence[int]] = None,
        pad_id: Optional[int] = None,
        seed: int = 0,
        critic: Optional[ModelArg] = None,
        tokenizer=None,
    ):
        policy, critic = _one_chunk(policy, "policy"), _one_chunk(critic, "critic")
        self.ps, self.cfg, self.tokenizer = ps, cfg or RolloutConfig(), tokenizer
        if policy.post_process and policy.value_head is not None:
            raise ConfigError("rollout: the policy model has a value head; pass it as critic= and give an LM as policy")
        if critic is not None and critic.post_process and critic.value_head is None:
            raise ConfigError("rollout: the critic needs model.value_head=true")
        if self.cfg.dtype not in ROLLOUT_DTYPES:
            raise ConfigError(f"rollout.dtype={self.cfg.dtype!r}: must be one of {', '.join(ROLLOUT_DTYPES)}")
        # the models generation runs: the trained chunks themselves, or their copies at rollout.dtype (rl/rollout/precision.py)
        self.weights = [SamplingWeights(m, ROLLOUT_DTYPES[self.cfg.dtype]) for m in (policy, critic) if m is not None]
        self.policy = self.weights[0].model
        self.critic = self.weights[1].model if critic is not None else None
        if stop_ids is None and tokenizer is not None:
            from data.chat import ChatTemplate

            stop_ids = ChatTemplate(tokenizer).stop_ids
        if stop_ids is None:
            raise ConfigError("rollout: no stop tokens; pass stop_ids=[eos, end_of_turn] or a tokenizer")
        self.device = next(self.policy.parameters()).device
        self.stop_ids = torch.tensor(sorted(set(int(i) for i in stop_ids)), dtype=torch.long, device=self.device)
        self.stop_set = frozenset(int(i) for i in stop_ids)  # per-step checks on the host copy of the tokens
        self.pad_id = int(pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else self.stop_ids[0]))
        self.generator = torch.Generator().manual_seed(seed)
        self.lockstep = ps.ep_size * ps.etp_size > 1 and dist.is_initialized()
        self.models = [w.model for w in self.weights]
        self.micro_batches = ps.pp_size  # micro-batches in flight: one per stage keeps every stage busy
        self.decode_forward = self._decode_forward_fn()

    @property
    def samples_with_trained_weights(self) -> bool:
        """True when generation runs the trained chunks themselves (``rollout.dtype`` is their dtype), so the
        behaviour log-probs are the training forward's; False with a copy at another precision, whose
        log-probs the PPO trainer recomputes (and corrects for with ``rl.tis_cap``)."""
        return not any(w.is_copy for w in self.weights)

    def _decode_forward_fn(self):
        """``_decode_forward``, compiled when ``rollout.compile`` is on and the layout allows it."""
        if not self.cfg.compile:
            return None
        blocker = compile_blocker(self.ps, self.device)
        if blocker is not None:
            warnings.warn(f"rollout.compile=true: decoding eagerly, because {blocker}", stacklevel=3)
            return None
        # cpp_wrapper: the code that calls the step's ~20 fused kernels and ~40 library ops is
        # C++ instead of Python (per step that Python cost ~0.8 of ~7 ms at the bench shape)
        return torch.compile(_decode_forward, options={"cpp_wrapper": True})

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: Optional[int] = None,
        sampling: Optional[SamplingParams] = None,
        max_new_tokens: Optional[int] = None,
    ) -> RolloutBatch:
        """``n`` (default ``rollout.samples_per_prompt``) continuations of every prompt (token ids)."""
        n = self.cfg.samples_per_prompt if n is None else n
        params = sampling or SamplingParams.from_config(self.cfg)
        max_new = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if n < 1 or max_new < 1:
            raise ConfigError(f"rollout: n={n} and max_new_tokens={max_new} must both be >= 1")
        prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        row_prompts = [prompts[r // n] for r in range(len(prompts) * n)]
        base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        seeds = [row_seed(base, self.ps.dp_rank, r) for r in range(len(row_prompts))]
        results = _Results()
        for weights in self.weights:  # the trained weights changed since the last call (a PPO step)
            weights.refresh()
        recorder = RouteRecorder(self.policy, self.ps, self.device)
        with generation_mode(self.models, self.ps):
            queue = deque(self._plan_chunks(row_prompts, max_new))
            slots: list = [None] * self.micro_batches  # the chunk each micro-batch slot is generating
            pending: dict = {}  # slot -> packet still arriving from the last stage
            sends: list = []  # the last stage's packet sends still in flight
            while self._anyone_working(any(c is not None for c in slots) or bool(queue)):
                for i in range(len(slots)):
                    if i in pending and self._apply(slots[i], self._arrived(pending.pop(i)), max_new, results):
                        slots[i] = None
                    if slots[i] is None and queue:
                        slots[i] = queue.popleft()
                        slots[i].generators = row_generators([seeds[r] for r in slots[i].rows], self.device) if not params.greedy else []
                        outputs = self._prefill(slots[i], max_new, recorder)
                    elif slots[i] is not None:
                        outputs = self._decode(slots[i], recorder)
                    else:
                        if self.lockstep:
                            self._dummy_forward()
                        continue
                    packet = self._sample_packet(slots[i], outputs, params)
                    if self.ps.pp_size == 1:
                        done = self._apply(slots[i], packet, max_new, results)
                    elif self.policy.post_process:
                        sends += self._send_packet(packet)
                        done = self._apply(slots[i], packet, max_new, results)
                    else:
                        pending[i], done = self._post_receive(packet), False
                    if done:
                        slots[i] = None
            for work in sends:
                work.wait()
        rows = range(len(row_prompts))
        batch = assemble(
            row_prompts,
            [results.tokens[r] for r in rows],
            [results.log_probs[r] for r in rows],
            [results.values[r] for r in rows] if self.critic is not None else None,
            [results.finish[r] for r in rows],
            [r // n for r in rows],
            self.pad_id,
        )
        if recorder.active:
            batch.routes_BSLA = recorder.assemble(len(row_prompts), batch.prompt_width, batch.tokens_BS.shape[1])
        return batch

    def generate_text(self, prompts: Sequence[str], max_new_tokens: Optional[int] = None, sampling: Optional[SamplingParams] = None) -> list:
        """Replies to single-turn user messages, rendered with the chat template; greedy unless ``sampling`` says otherwise.

        For using the policy as a judge (LLM verifier): one reply per prompt, stop token removed.
        """
        if self.tokenizer is None:
            raise ConfigError("rollout: generate_text needs the engine built with tokenizer=...")
        from data.chat import ChatTemplate

        template = ChatTemplate(self.tokenizer)
        ids = [template.render_prompt([{"role": "user", "content": p}]) for p in prompts]
        batch = self.generate(ids, n=1, sampling=sampling or SamplingParams(temperature=0.0), max_new_tokens=max_new_tokens)
        stops = set(self.stop_ids.tolist())
        out = []
        for reply, reason in zip(batch.responses(), batch.finish_reasons):
            out.append(self.tokenizer.decode(reply[:-1] if reason == FINISH_STOP and reply and reply[-1] in stops else reply))
        return out

    # ------------------------------------------------------------------ planning
    def _check_prompt(self, i: int, prompt: Sequence[int]) -> list:
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"rollout: prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        vocab = self.policy.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"rollout: prompt {i} has token ids outside [0, {vocab}); was it tokenized with another vocabulary?")
        return ids

    def _plan_chunks(self, row_prompts: list, max_new: int) -> list:
        """Rows sorted by prompt length, cut into chunks whose caches fit the budget.

        Under pp, ``micro_batches`` chunks are alive at once, so each gets that share of
        the budget, and rows are spread over at least that many chunks.
        """
        per_slot = sum(kv_bytes_per_slot(m) for m in self.models)
        budget = int(self.cfg.kv_cache_budget_mb * 2**20) // self.micro_batches
        max_rows = -(-len(row_prompts) // self.micro_batches)
        multiple = context_parallel.sequence_multiple(self.ps)
        order = sorted(range(len(row_prompts)), key=lambda r: len(row_prompts[r]))
        chunks, current = [], []
        for r in order:
            width = -(-len(row_prompts[r]) // multiple) * multiple  # sorted: the newest row is the longest
            per_row = per_slot * (width + max_new)
            if per_row > budget:
                raise ConfigError(
                    f"rollout.kv_cache_budget_mb={self.cfg.kv_cache_budget_mb} (/ {self.micro_batches} micro-batches) cannot hold one sequence of "
                    f"{len(row_prompts[r])} prompt + {max_new} new tokens ({per_row / 2**20:.2f} MB on this rank); "
                    "fix: raise kv_cache_budget_mb, lower max_new_tokens or shorten the prompts"
                )
            if current and ((len(current) + 1) * per_row > budget or len(current) == max_rows):
                chunks.append(self._new_chunk(current, row_prompts))
                current = []
            current.append(r)
        if current:
            chunks.append(self._new_chunk(current, row_prompts))
        return chunks

    def _new_chunk(self, rows: list, row_prompts: list) -> _Chunk:
        longest = max(len(row_prompts[r]) for r in rows)
        multiple = context_parallel.sequence_multiple(self.ps)
        return _Chunk(rows=list(rows), prompts=[row_prompts[r] for r in rows], width=-(-longest // multiple) * multiple)

    # ------------------------------------------------------------------ the loop
    def _anyone_working(self, mine: bool) -> bool:
        if not self.lockstep:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _prefill(self, chunk: _Chunk, max_new: int, recorder: RouteRecorder) -> tuple:
        B, P = len(chunk.rows), chunk.width
        ids_BS = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask_BS = torch.zeros(B, P, dtype=torch.bool)
        for b, p in enumerate(chunk.prompts):
            ids_BS[b, P - len(p):] = torch.as_tensor(p)
            mask_BS[b, P - len(p):] = True
        pos_BS = (mask_BS.long().cumsum(1) - 1).clamp(min=0)
        chunk.prompt_lens_B = mask_BS.sum(1).to(self.device)
        padding = None if bool(mask_BS.all()) else mask_BS.to(self.device)
        chunk.cache = self.policy.allocate_kv_cache(B, P + max_new)
        chunk.critic_cache = self.critic.allocate_kv_cache(B, P + max_new) if self.critic is not None else None
        if self.decode_forward is not None:
            for cache in (chunk.cache, chunk.critic_cache):
                if cache is not None:
                    _mark_dynamic_sizes(cache)
        sharded = context_parallel.is_active(self.ps)
        if sharded:  # each cp rank prefills its share; all cache the whole prompt
            ids_BS, pos_BS = context_parallel.shard_sequence(ids_BS, self.ps), context_parallel.shard_sequence(pos_BS, self.ps)
            padding = context_parallel.shard_sequence(padding, self.ps) if padding is not None else None
        outputs = self._forward_all(ids_BS.to(self.device), pos_BS.to(self.device), padding, chunk)
        if recorder.active:
            recorder.prefill(chunk.rows, chunk.prompts, sharded)
        return outputs

    def _decode(self, chunk: _Chunk, recorder: RouteRecorder) -> tuple:
        pos_BS = (chunk.prompt_lens_B + chunk.steps - 1).unsqueeze(1).to(self.device)
        ids_BS = chunk.next_ids_B.unsqueeze(1).to(self.device)
        if self.decode_forward is None:
            outputs = self._forward_all(ids_BS, pos_BS, None, chunk)
        else:
            torch._dynamo.maybe_mark_dynamic(ids_BS, 0)
            torch._dynamo.maybe_mark_dynamic(pos_BS, 0)
            outputs = []
            for model, cache in ((self.policy, chunk.cache), (self.critic, chunk.critic_cache)):
                outputs.append(self.decode_forward(model, ids_BS, pos_BS, cache) if model is not None else None)
                if cache is not None:
                    cache.advance(1)
            outputs = tuple(outputs)
        if recorder.active:
            recorder.decode(chunk.rows, chunk.steps)
        return outputs

    def _dummy_forward(self) -> None:
        """A one-token forward without cache: keeps expert-parallel collectives matched."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        for model in self.models:
            self._forward(model, ids, None, None, None)

    def _forward_all(self, ids_BS, pos_BS, padding_BS, chunk: _Chunk) -> tuple:
        """Last-position logits ``[b, V/tp]`` and values ``[b]`` (None off the last stage / without critic)."""
        sharded = context_parallel.is_sharded_forward(self.ps, ids_BS.shape[1], chunk.cache)
        logits = self._forward(self.policy, ids_BS, pos_BS, padding_BS, chunk.cache)
        values = self._forward(self.critic, ids_BS, pos_BS, padding_BS, chunk.critic_cache) if self.critic is not None else None
        outputs = [x[:, -1] if x is not None else None for x in (logits, values)]
        if sharded:  # a cp prefill: the prompt's last position is on cp rank 0
            outputs = [context_parallel.last_position(x, self.ps) if x is not None else None for x in outputs]
        return tuple(outputs)

    def _forward(self, model: GPTModel, ids_BS, pos_BS, padding_BS, cache) -> Optional[torch.Tensor]:
        """One forward through every pipeline stage; the output on the last stage, else None."""
        ps = self.ps
        kwargs = dict(position_ids_BS=pos_BS, padding_mask_BS=padding_BS, kv_cache=cache, last_position_only=model.post_process)
        if model.pre_process:
            out = model(ids_BS, **kwargs)
        else:
            hidden = torch.empty(*ids_BS.shape, model.cfg.hidden_size, dtype=next(model.parameters()).dtype, device=self.device)
            dist.recv(hidden, src=ps.global_rank("pp", ps.pp_rank - 1), group=ps.group("pp"), tag=ACTIVATION_TAG)
            out = model(hidden_BSH=hidden, **kwargs)
        if model.post_process:
            return out
        dist.send(out.contiguous(), dst=ps.global_rank("pp", ps.pp_rank + 1), group=ps.group("pp"), tag=ACTIVATION_TAG)
        return None

    # ------------------------------------------------------------------ token feedback
    def _sample_packet(self, chunk: _Chunk, outputs: tuple, params: SamplingParams) -> torch.Tensor:
        """``[3, b]`` float64 (tokens, log-probs, values): sampled on the last stage, a receive buffer elsewhere."""
        logits_BV, values_B = outputs
        packet = torch.zeros(3, len(chunk.rows), dtype=torch.float64, device=self.device)
        if self.policy.post_process:
            tokens_B, log_probs_B = sample(logits_BV, params, chunk.generators, self.ps)
            packet[0], packet[1] = tokens_B.double(), log_probs_B.double()
            if values_B is not None:
                packet[2] = values_B.double()
        return packet

    def _send_packet(self, packet: torch.Tensor) -> list:
        """Last stage: send the packet to every other stage without waiting (they need it next round)."""
        ps = self.ps
        group = ps.group("pp")
        return [dist.isend(packet, dst=ps.global_rank("pp", s), group=group, tag=PACKET_TAG) for s in range(ps.pp_size - 1)]

    def _post_receive(self, packet: torch.Tensor) -> tuple:
        ps = self.ps
        return dist.irecv(packet, src=ps.global_rank("pp", ps.pp_size - 1), group=ps.group("pp"), tag=PACKET_TAG), packet

    @staticmethod
    def _arrived(receive: tuple) -> torch.Tensor:
        work, packet = receive
        work.wait()
        return packet

    def _apply(self, chunk: _Chunk, packet: torch.Tensor, max_new: int, results: _Results) -> bool:
        """Store the sampled tokens, drop ended rows from the batch and caches; True when the chunk is done.

        The packet crosses to the host once (``tolist``) and the stop checks and row bookkeeping
        run on those Python lists: one host sync a step, no small device ops for the checks.
        """
        chunk.steps += 1
        tokens, log_probs, values = packet.tolist()
        stopped = [int(t) in self.stop_set for t in tokens]
        for row, token, log_prob, value in zip(chunk.rows, tokens, log_probs, values):
            results.add(row, int(token), log_prob, value)
        if chunk.steps >= max_new:
            for row, stop in zip(chunk.rows, stopped):
                results.finish[row] = FINISH_STOP if stop else FINISH_LENGTH
            return True
        for row, stop in zip(chunk.rows, stopped):
            if stop:
                results.finish[row] = FINISH_STOP
        if all(stopped):
            return True
        tokens_B = packet[0].long()
        if any(stopped):
            keep_list = [b for b, stop in enumerate(stopped) if not stop]
            keep = torch.tensor(keep_list, device=self.device)
            chunk.cache.select(keep)
            if chunk.critic_cache is not None:
                chunk.critic_cache.select(keep)
            chunk.rows = [chunk.rows[i] for i in keep_list]
            chunk.generators = [chunk.generators[i] for i in keep_list] if chunk.generators else []
            chunk.prompt_lens_B = chunk.prompt_lens_B[keep]
            tokens_B = tokens_B[keep]
        chunk.next_ids_B = tokens_B
        return False
