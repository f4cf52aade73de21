"""Forward/backward over the micro-batches of one step: no pipeline, 1F1B, interleaved 1F1B.

Contract shared by every schedule::

    forward_backward(chunks, microbatches, loss_fn, ps, schedule, forward_only) -> list

``chunks``: this rank's model chunks (one per virtual stage, from
``build_model_chunks``); ``microbatches``: a list of dicts (every rank gets them; the
first stage reads ``input_ids_BS``, the last stage the labels); ``loss_fn(output,
microbatch) -> (loss, stats)`` runs on the last stage, ``loss`` already normalised so
that summing over micro-batches and data-parallel ranks gives the step's loss. Returns
the ``stats`` of each micro-batch, in micro-batch order, on the last stage (an empty
list elsewhere). With ``forward_only`` no gradient is computed and ``loss_fn`` may
return any output in ``stats`` (evaluation, log-probs).

Schedules (Megatron-core's ``schedules.py``), ``M`` micro-batches, ``P`` stages, rank ``r``:

* ``1f1b``: ``min(P - r - 1, M)`` warm-up forwards, then one forward + one backward per
  step (steady state), then the remaining backwards (cool-down). At most ``P - r``
  activations are alive at once.
* ``gpipe``: every forward, then every backward (the 1F1B loop with ``M`` warm-up steps).
* ``interleaved`` (``V = len(chunks) > 1`` virtual stages): chunk ``v`` of rank ``r`` is
  global stage ``v * P + r``; forwards run in groups of ``P`` micro-batches per chunk,
  warm-up ``(P - r - 1) * 2 + (V - 1) * P`` steps. Needs ``M % P == 0``.

Activations ``[B, S/tp if sequence parallel else S, H]`` (``S`` this rank's share under
context parallelism) and their gradients move between neighbouring stages over the pp
group with ``isend``/``irecv``; the last rank's "next" is rank 0 (interleaved chunks wrap
around). Activations use tag 0, gradients tag 1, so the two streams never mix when both
neighbours are the same rank (pp=2).

MoE aux losses ride on the activations (``AuxLossAutoScaler``), so every stage's backward
through its output brings their gradients in; no loss is sent between stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_seed.parallel.state import ParallelState

ACTIVATION_TAG, GRADIENT_TAG = 0, 1
SCHEDULES = ("1f1b", "interleaved", "gpipe")


def model_inputs(mb: dict) -> dict:
    """The keyword arguments of ``GPTModel.forward`` present in a micro-batch."""
    keys = ("position_ids_BS", "doc_ids_BS", "padding_mask_BS", "routes_BSLA", "compare_routes_BS")
    return {k: mb[k] for k in keys if k in mb}


# ----------------------------------------------------------------------------- one micro-batch


def forward_step(model, mb: dict, input_BSH: Optional[torch.Tensor], loss_fn: Callable, stats: list) -> torch.Tensor:
    """Run one chunk on one micro-batch: the stage output, or the loss on the last stage."""
    if model.pre_process:
        output = model(mb["input_ids_BS"], **model_inputs(mb))
    else:
        output = model(hidden_BSH=input_BSH, **model_inputs(mb))
    if not model.post_process:
        return output
    loss, mb_stats = loss_fn(output, mb)
    stats.append(mb_stats)
    return loss


def backward_step(input_BSH: Optional[torch.Tensor], output: torch.Tensor, output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Backward through one chunk; returns the gradient of its input (None on the first stage)."""
    if output_grad is None:  # last stage: ``output`` is the scalar loss
        output.backward()
    else:
        torch.autograd.backward(output, grad_tensors=output_grad)
    return input_BSH.grad if input_BSH is not None else None


def forward_backward_no_pipelining(chunks: list, microbatches: list, loss_fn: Callable, forward_only: bool = False) -> list:
    (model,) = chunks
    stats: list = []
    for mb in microbatches:
        with torch.set_grad_enabled(not forward_only):
            loss = forward_step(model, mb, None, loss_fn, stats)
        if not forward_only:
            loss.backward()
    return stats


# ----------------------------------------------------------------------------- communication


@dataclass
class P2P:
    """Point-to-point exchange of activations and gradients with the neighbouring stages."""

    ps: ParallelState
    shape: tuple  # [B, S_local, H] of the activations between stages
    dtype: torch.dtype
    device: torch.device

    @property
    def next_rank(self) -> int:
        return self.ps.global_rank("pp", (self.ps.pp_rank + 1) % self.ps.pp_size)

    @property
    def prev_rank(self) -> int:
        return self.ps.global_rank("pp", (self.ps.pp_rank - 1) % self.ps.pp_size)

    def communicate(
        self,
        send_next: Optional[torch.Tensor] = None,
        send_prev: Optional[torch.Tensor] = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> tuple:
        """Send an activation forward / a gradient backward and receive the other ends.

        Returns ``(activation from prev or None, gradient from next or None)``. The
        transfers go out as one ``batch_isend_irecv`` (a NCCL group call), so paired
        neighbours never deadlock; ops are issued activations first, then gradients, on
        every rank, so backends that match by issue order (NCCL) agree with those
        matching by tag (gloo).
        """
        group = self.ps.group("pp")
        ops = []
        from_prev = self._empty(requires_grad=True) if recv_prev else None
        from_next = self._empty() if recv_next else None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), self.next_rank, group, ACTIVATION_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev.data, self.prev_rank, group, ACTIVATION_TAG))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.detach().contiguous(), self.prev_rank, group, GRADIENT_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, group, GRADIENT_TAG))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        return from_prev, from_next

    def _empty(self, requires_grad: bool = False) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, requires_grad=requires_grad)


def activation_shape(mb: dict, hidden_size: int, ps: ParallelState) -> tuple:
    """``[B, S/tp if sequence parallel else S, H]``: what flows between stages."""
    B, S = mb["input_ids_BS"].shape
    if ps.sequence_parallel:
        if S % ps.tp_size:
            raise ValueError(f"sequence length {S} is not divisible by tp={ps.tp_size} (sequence parallel)")
        S //= ps.tp_size
    return (B, S, hidden_size)


_P2P_READY: set = set()


def _p2p(chunks: list, microbatches: list, ps: ParallelState) -> P2P:
    """The exchange of this schedule run; called by every rank of the pp group at its start."""
    param = next(p for m in chunks for p in m.parameters())
    group = ps.group("pp")
    if id(group) not in _P2P_READY:
        # NCCL: the first batch_isend_irecv on a group must involve all its ranks (torch docs);
        # the first stage's first exchange does not, so the group's first op is a barrier.
        dist.barrier(group=group)
        _P2P_READY.add(id(group))
    shapes = {activation_shape(mb, chunks[0].cfg.hidden_size, ps) for mb in microbatches}
    if len(shapes) != 1:
        raise ValueError(f"pipeline parallel needs micro-batches of one shape; got {sorted(shapes)}")
    return P2P(ps, shapes.pop(), param.dtype, param.device)


# ----------------------------------------------------------------------------- 1F1B / GPipe


def forward_backward_1f1b(
    chunks: list, microbatches: list, loss_fn: Callable, ps: ParallelState, forward_only: bool = False, all_warmup: bool = False
) -> list:
    """Non-interleaved 1F1B (``all_warmup``: GPipe, every forward before any backward)."""
    (model,) = chunks
    comm = _p2p(chunks, microbatches, ps)
    M = len(microbatches)
    warmup = M if all_warmup else min(ps.pp_size - ps.pp_rank - 1, M)
    remaining = M - warmup
    stats: list = []
    inputs: list = []
    outputs: list = []
    grad_ctx = torch.no_grad() if forward_only else torch.enable_grad()

    def forward(i: int, input_BSH: Optional[torch.Tensor]) -> torch.Tensor:
        with grad_ctx:
            out = forward_step(model, microbatches[i], input_BSH, loss_fn, stats)
        if not forward_only:
            inputs.append(input_BSH)
            outputs.append(out)
        return out

    def to_send(out: torch.Tensor) -> Optional[torch.Tensor]:
        return None if model.post_process else out

    def backward(output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return backward_step(inputs.pop(0), outputs.pop(0), output_grad)

    recv_prev = not model.pre_process
    for i in range(warmup):
        input_BSH, _ = comm.communicate(recv_prev=recv_prev)
        out = forward(i, input_BSH)
        comm.communicate(send_next=to_send(out))

    input_BSH = comm.communicate(recv_prev=recv_prev)[0] if remaining else None
    for j in range(remaining):
        last = j == remaining - 1
        out = forward(warmup + j, input_BSH)
        if forward_only:
            comm.communicate(send_next=to_send(out))
            if not last:
                input_BSH = comm.communicate(recv_prev=recv_prev)[0]
            continue
        _, output_grad = comm.communicate(send_next=to_send(out), recv_next=not model.post_process)
        input_grad = backward(output_grad)
        if last:
            comm.communicate(send_prev=input_grad)
        else:
            input_BSH, _ = comm.communicate(send_prev=input_grad, recv_prev=recv_prev)

    if not forward_only:
        for _ in range(warmup):
            _, output_grad = comm.communicate(recv_next=not model.post_process)
            comm.communicate(send_prev=backward(output_grad))
    return stats


# ----------------------------------------------------------------------------- interleaved 1F1B


def forward_backward_interleaved(chunks: list, microbatches: list, loss_fn: Callable, ps: ParallelState, forward_only: bool = False) -> list:
    """Megatron's interleaved 1F1B over ``V = len(chunks)`` virtual stages per rank.

    Step ``k`` (forward or backward) works on chunk ``(k mod P*V) // P`` (reversed for
    backward) and micro-batch ``(k // (P*V)) * P + k mod P`` of that chunk.
    """
    P, r, V, M = ps.pp_size, ps.pp_rank, len(chunks), len(microbatches)
    if M % P:
        raise ValueError(
            f"interleaved pipeline: {M} micro-batches per step is not a multiple of pp={P}; "
            f"fix: make global_batch_size / (micro_batch_size * dp) a multiple of {P}"
        )
    comm = _p2p(chunks, microbatches, ps)
    total = M * V
    if forward_only:
        warmup = total
    elif M == P:
        warmup = total
    else:
        warmup = min((P - r - 1) * 2 + (V - 1) * P, total)
    all_warmup = warmup == total
    remaining = total - warmup
    first_rank, last_rank = r == 0, r == P - 1

    inputs: list = [[] for _ in range(V)]
    outputs: list = [[] for _ in range(V)]
    output_grads: list = [[] for _ in range(V)]
    stats: list = []
    grad_ctx = torch.no_grad() if forward_only else torch.enable_grad()

    def chunk_id(k: int, forward: bool) -> int:
        v = (k % (P * V)) // P
        return v if forward else V - v - 1

    def microbatch_id(k: int) -> int:
        return (k // (P * V)) * P + k % P

    def is_first(v: int) -> bool:
        return first_rank and v == 0

    def is_last(v: int) -> bool:
        return last_rank and v == V - 1

    def forward(k: int) -> Optional[torch.Tensor]:
        v = chunk_id(k, True)
        if is_first(v):
            inputs[v].append(None)
        with grad_ctx:
            out = forward_step(chunks[v], microbatches[microbatch_id(k)], inputs[v][-1], loss_fn, stats)
        if forward_only:
            inputs[v].pop()
        else:
            outputs[v].append(out)
        return None if is_last(v) else out

    def backward(k: int) -> Optional[torch.Tensor]:
        v = chunk_id(k, False)
        if is_last(v):
            output_grads[v].append(None)
        input_grad = backward_step(inputs[v].pop(0), outputs[v].pop(0), output_grads[v].pop(0))
        return None if is_first(v) else input_grad

    if not first_rank:
        inputs[0].append(comm.communicate(recv_prev=True)[0])
    for k in range(warmup):
        out = forward(k)
        next_v = chunk_id(k + 1, True)
        recv_prev = not (first_rank and next_v == 0) and k != total - 1
        if k == warmup - 1 and not forward_only and not all_warmup:
            input_BSH, output_grad = comm.communicate(send_next=out, recv_prev=recv_prev, recv_next=not last_rank)
            if not last_rank:
                output_grads[V - 1].append(output_grad)
        else:
            input_BSH, _ = comm.communicate(send_next=out, recv_prev=recv_prev)
        if recv_prev:
            inputs[next_v].append(input_BSH)

    for j in range(remaining):
        fk, bk = warmup + j, j
        out = forward(fk)
        input_grad = backward(bk)
        if first_rank:
            next_fv = chunk_id(fk - (P - 1), True)
            recv_prev = next_fv != V - 1
            next_fv += 1
        else:
            recv_prev, next_fv = True, chunk_id(fk + 1, True)
        if last_rank:
            next_bv = chunk_id(bk - (P - 1), False)
            recv_next = next_bv != 0
            next_bv -= 1
        else:
            recv_next, next_bv = True, chunk_id(bk + 1, False)
        if j == remaining - 1:
            recv_prev = False
        input_BSH, output_grad = comm.communicate(send_next=out, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_fv].append(input_BSH)
        if recv_next:
            output_grads[next_bv].append(output_grad)

    if not forward_only:
        if all_warmup and not last_rank:
            output_grads[V - 1].append(comm.communicate(recv_next=True)[1])
        for k in range(remaining, total):
            input_grad = backward(k)
            next_bv = chunk_id(k + 1, False)
            recv_next = not (last_rank and next_bv == V - 1) and k != total - 1
            _, output_grad = comm.communicate(send_prev=input_grad, recv_next=recv_next)
            if recv_next:
                output_grads[next_bv].append(output_grad)
    return stats


# ----------------------------------------------------------------------------- entry point


def forward_backward(
    chunks: list, microbatches: list, loss_fn: Callable, ps: ParallelState, schedule: str = "1f1b", forward_only: bool = False
) -> list:
    """Run ``schedule`` over the micro-batches (see the module docstring for the contract)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if ps.pp_size == 1:
        return forward_backward_no_pipelining(chunks, microbatches, loss_fn, forward_only)
    if len(chunks) > 1:
        if schedule == "gpipe":
            raise ValueError(f"the gpipe schedule runs one model chunk per rank; got {len(chunks)} (set parallel.virtual_pp=1)")
        return forward_backward_interleaved(chunks, microbatches, loss_fn, ps, forward_only)
    if schedule == "interleaved":
        raise ValueError("the interleaved schedule needs parallel.virtual_pp > 1 model chunks per pipeline rank")
    return forward_backward_1f1b(chunks, microbatches, loss_fn, ps, forward_only, all_warmup=schedule == "gpipe")
