"""The one train step every phase runs: pretraining, SFT, the PPO actor and critic, value
pretraining and the pairwise reward model.

:meth:`Trainer.train_step` takes this rank's share of one optimizer step's global batch
(a dict of ``[B, ...]`` tensors) and a :class:`LossSpec`:

1. the batch is cut into ``train.micro_batch_size``-row micro-batches (or comes as a list of
   ready micro-batches: the RL steps' packed rows, ``train.max_tokens_per_micro_batch``);
2. ``spec.units(mb)`` counts what the loss is normalised by (tokens, positive tokens,
   sequences, pairs); the counts are summed over the micro-batches and the ``dp``
   ranks into the step's global totals ``N`` (cp ranks hold the same sequences, see below);
3. ``spec.build(N, ps)`` gives the micro-batch loss ``loss_fn(output, mb) -> (loss, shares)``:
   ``loss`` is the micro-batch's share of the global loss (e.g. ``sum of NLL / N_tok``), so
   summing the micro-batch gradients and all-reducing them with SUM over ``dp_cp`` (what
   the optimizer does) gives the one-process gradient of the whole global batch;
   ``shares`` are metrics in the same form (0-d tensors whose sum over micro-batches and
   ranks is the global value);
4. the pipeline schedule runs forward/backward; the shares are summed over micro-batches
   and ``dp_cp`` (:func:`reduce_sums`), ``spec.finalize`` turns them into reported metrics
   (e.g. moments into explained variance) and the last pipeline stage shares them with
   the others, so every rank returns the same metrics;
5. the optimizer reduces, clips and applies the gradients.

:meth:`Trainer.forward` is the forward-only counterpart (behaviour / reference
log-probs, critic values, reward-model scores). Language-model micro-batch keys:
``input_ids_BS``, ``labels_BS``, ``loss_mask_BS`` (float), optionally
``position_ids_BS``, ``doc_ids_BS`` (packing) and ``padding_mask_BS``.

Context parallelism: every cp rank is given the same whole sequences. The units are
counted on them and summed over ``dp`` only (a sequence or pair counts once, not once per
rank holding part of it); :meth:`Trainer.cut_for_cp` then cuts each micro-batch to the
rank's share, whose loss shares are summed over ``dp_cp`` as above
(:mod:`megatron_seed.parallel.context_parallel`).

A NaN/Inf loss or gradient norm stops the run before the update, saying at which
step; the last checkpoint written stays the latest.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_seed.config import Config, ConfigError
from megatron_seed.model.build import build_model_chunks, param_dtype
from megatron_seed.parallel import context_parallel
from megatron_seed.parallel.mappings import reduce_scalars
from megatron_seed.parallel.pipeline import forward_backward
from megatron_seed.parallel.state import ParallelState
from megatron_seed.parallel.tensor_parallel import vocab_parallel_log_probs
from megatron_seed.train import checkpoint
from megatron_seed.train.metrics import MetricsLogger, flops_per_token, peak_flops
from megatron_seed.train.optimizer import NonFiniteGradError, build_optimizer
from megatron_seed.train.schedule import lr_at
from moe.router import update_expert_biases


class NonFiniteLossError(FloatingPointError):
    pass


def split_microbatches(batch: dict, micro_batch_size: int) -> list:
    """Cut a dict of ``[B, ...]`` tensors into dicts of ``micro_batch_size`` rows."""
    B = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, B, micro_batch_size)]


def lm_batch(tokens_BS1: torch.Tensor) -> dict:
    """Next-token prediction inputs from ``[B, S+1]`` token windows."""
    return {
        "input_ids_BS": tokens_BS1[:, :-1],
        "labels_BS": tokens_BS1[:, 1:],
        "loss_mask_BS": torch.ones(tokens_BS1.shape[0], tokens_BS1.shape[1] - 1, device=tokens_BS1.device),
    }


LossFn = Callable[[torch.Tensor, dict], tuple]


@dataclass(frozen=True)
class LossSpec:
    """How one optimizer step builds its loss (steps 2-4 of the module docstring).

    ``units(mb) -> {name: count}``: this micro-batch's counts of the normaliser's units.
    ``build(totals, ps) -> loss_fn``: the micro-batch loss from the global totals (floats).
    ``finalize(sums) -> metrics``: reported metrics from the summed shares (default: as they are).
    """

    units: Callable[[dict], dict]
    build: Callable[[dict, ParallelState], LossFn]
    finalize: Optional[Callable[[dict], dict]] = None


def lm_loss_fn(ps: ParallelState, normaliser: float) -> LossFn:
    """Sum of masked NLL over the micro-batch / ``normaliser`` (global loss tokens)."""

    def loss_fn(logits_BSV: torch.Tensor, mb: dict) -> tuple:
        nll_BS = -vocab_parallel_log_probs(logits_BSV, mb["labels_BS"], ps)
        nll_sum = (nll_BS * mb["loss_mask_BS"]).sum()
        return nll_sum / normaliser, {}

    return loss_fn


LM_LOSS = LossSpec(units=lambda mb: {"tokens": mb["loss_mask_BS"].sum()},
                   build=lambda totals, ps: lm_loss_fn(ps, max(1.0, totals["tokens"])))


def reduce_sums(values: dict, group, device: torch.device) -> dict:
    """``{name: sum over group of value}`` as floats (one float64 all-reduce on ``device``; every rank
    passes the same keys)."""
    keys = sorted(values)
    return dict(zip(keys, reduce_scalars([values[k] for k in keys], group, device=device)))


def sum_shares(parts: list) -> dict:
    """Sum the per-micro-batch metric shares key by key (every part has the same keys)."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64).detach()
    return out


class Trainer:
    """Owns the model chunks, optimizer and step counter of one rank."""

    def __init__(self, cfg: Config, ps: ParallelState, chunks: Optional[list] = None):
        self.cfg, self.ps = cfg, ps
        torch.manual_seed(cfg.train.seed)
        self.chunks = chunks if chunks is not None else build_model_chunks(
            cfg.model, cfg.parallel, ps, cfg.train.seed, param_dtype(cfg.train.precision, ps.device))
        self.optimizer = build_optimizer(self.chunks, cfg.train, ps, cfg.parallel.zero1, cfg.parallel.overlap_grad_reduce)
        self.step = 0
        self._pending_save: Optional[checkpoint.PendingSave] = None  # an asynchronous save not yet published
        self.consumed_samples = 0
        per_step = cfg.train.micro_batch_size * ps.dp_size
        if cfg.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by micro_batch_size x dp = "
                f"{cfg.train.micro_batch_size} x {ps.dp_size}; fix: make it a multiple of {per_step}"
            )
        self.num_microbatches = cfg.train.global_batch_size // per_step
        self.is_logging_rank = ps.rank == ps.layout.world - 1 if ps.layout.world > 1 else True

    @property
    def local_batch_size(self) -> int:
        """Rows of the global batch this rank's data-parallel replica trains on per step."""
        return self.cfg.train.micro_batch_size * self.num_microbatches

    def microbatches(self, batch) -> list:
        """This rank's rows of a batch cut into micro-batches, on the rank's device. A list is taken as
        the micro-batches themselves (packed rows of several sequences, :mod:`rl.packing`)."""
        parts = batch if isinstance(batch, list) else split_microbatches(batch, self.cfg.train.micro_batch_size)
        return [{k: v.to(self.ps.device, non_blocking=True) for k, v in mb.items()} for mb in parts]

    def lr(self) -> float:
        t = self.cfg.train
        return lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.steps)

    def train_step(self, batch: dict, loss: LossSpec = LM_LOSS) -> dict:
        """One optimizer step on this rank's share of the global batch (see the module docstring).

        Returns (on every rank) ``loss`` (the global loss), the unit totals, the finalized
        metrics of ``loss``, ``grad_norm``, ``lr`` and the MoE aux loss.
        """
        whole = self.microbatches(batch)
        # every cp rank holds the same whole sequences: their units summed over dp are the global totals
        totals = reduce_sums(sum_shares([loss.units(mb) for mb in whole]), self.ps.group("dp"), self.ps.device)
        microbatches = self.cut_for_cp(whole)
        loss_fn = loss.build(totals, self.ps)
        losses: list = []

        def recording_loss_fn(output: torch.Tensor, mb: dict) -> tuple:
            value, shares = loss_fn(output, mb)
            losses.append(value.detach())
            return value, shares

        stats = self.forward_backward(microbatches, recording_loss_fn)
        metrics = None
        if self.ps.is_last_stage:
            sums = reduce_sums({"loss": sum(losses, 0.0), **sum_shares(stats)}, self.ps.group("dp_cp"), self.ps.device)
            metrics = loss.finalize(sums) if loss.finalize is not None else sums
        metrics = self._from_last_stage(metrics)
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {self.step}")
        grad_norm, lr = self.optimizer_step()
        return {**metrics, **totals, "grad_norm": grad_norm, "lr": lr, **self.moe_stats()}

    def forward(self, batch: dict, fn: Callable[[torch.Tensor, dict], torch.Tensor], chunks: Optional[list] = None) -> Optional[torch.Tensor]:
        """``fn(output, mb)`` of every micro-batch without gradients, concatenated along the batch.
        ``fn`` returns per-token ``[B, S]`` tensors: under context parallelism it sees this
        rank's share of the sequence and the result comes back whole.

        ``chunks``: other model chunks on this trainer's groups (a frozen reference
        policy); default this trainer's. The result lives on the last pipeline stage
        (None elsewhere).
        """
        chunks = self.chunks if chunks is None else chunks
        for m in chunks:
            m.eval()
        microbatches = self.cut_for_cp(self.microbatches(batch))
        with torch.no_grad():
            parts = forward_backward(chunks, microbatches, lambda out, mb: (torch.zeros((), device=self.ps.device), fn(out, mb)), self.ps,
                                     self.cfg.parallel.pp_schedule, forward_only=True)
        return context_parallel.gather_sequence(torch.cat(parts, dim=0), self.ps) if parts else None

    def cut_for_cp(self, microbatches: list) -> list:
        """Under context parallelism, this rank's share of every sequence of the micro-batches
        (the one place a step's batch is cut over cp; each rank is given whole sequences)."""
        return [context_parallel.shard_microbatch(mb, self.ps) for mb in microbatches]

    def _from_last_stage(self, metrics: Optional[dict]) -> dict:
        """The last pipeline stage's metrics on every stage (the loss lives there; every rank must stop together)."""
        if self.ps.pp_size == 1:
            return metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=self.ps.global_rank("pp", self.ps.pp_size - 1), group=self.ps.group("pp"))
        return box[0]

    def forward_backward(self, microbatches: list, loss_fn: Callable) -> list:
        """Zero the gradients, then accumulate those of ``loss_fn`` over ``microbatches`` (no update).

        ``loss_fn(output, microbatch) -> (loss, stats)`` must return each micro-batch's
        share of the global loss (see :class:`LossSpec`). Returns the stats of the last
        pipeline stage.
        """
        for m in self.chunks:
            m.train()
            m.set_aux_loss_scale(1.0 / (len(microbatches) * self.ps.dp_size))
        self.optimizer.zero_grad()
        self.optimizer.expect_backward_passes(len(microbatches))  # dp all-reduce overlaps the last one
        return forward_backward(self.chunks, microbatches, loss_fn, self.ps, self.cfg.parallel.pp_schedule)

    def optimizer_step(self) -> tuple:
        """Reduce, clip and apply the accumulated gradients; returns ``(grad_norm, lr)``."""
        lr = self.lr()
        grad_norm = self.optimizer.step(lr)
        for m in self.chunks:  # aux-loss-free balancing: biases follow the load seen this step
            update_expert_biases(m)
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        return grad_norm, lr

    def moe_stats(self) -> dict:
        """Aux loss of the last micro-batch, averaged over every MoE layer of the model.

        Collective over pp (call on every rank): each stage holds only its own layers.
        """
        layers = [m for c in self.chunks for m in c.moe_layers()]
        aux = [m.last_stats["aux_loss"] for m in layers if m.last_stats.get("aux_loss") is not None]
        aux_sum, count = reduce_scalars([torch.stack(aux).sum() if aux else 0.0, len(aux)], self.ps.group("pp"), device=self.ps.device)
        return {"moe_aux_loss": aux_sum / count} if count else {}

    # ------------------------------------------------------------------ checkpoints
    def layout_record(self) -> dict:
        l = self.ps.layout
        return {"world": l.world, "tp": l.tp, "pp": l.pp, "dp": l.dp, "ep": l.ep, "etp": l.etp, "cp": l.cp, "virtual_pp": self.cfg.parallel.virtual_pp}

    def checkpoint_pieces(self) -> list:
        """What a checkpoint holds of this rank: model and optimizer slices of global tensors, RNG states."""
        return (checkpoint.model_pieces(self.chunks, self.ps) + checkpoint.optimizer_pieces(self.optimizer, self.chunks, self.ps)
                + checkpoint.rng_pieces(self.ps.rank))

    def save(self, extra: Optional[dict] = None, async_save: bool = False) -> str:
        """Collective: checkpoint the step, weights, optimizer, RNG and data position (plus ``extra``,
        this rank's JSON/tensor state such as an RL sampler's) into ``train.save_dir``; returns its path.

        ``async_save``: the tensors are copied and written in the background; the checkpoint is
        published (``latest`` moved) by the next :meth:`save` or :meth:`finish_save`.
        """
        self.finish_save()
        state = {"trainer": {"step": self.step, "consumed_samples": self.consumed_samples},
                 "optimizer": {"step": self.optimizer.step_count},
                 "meta": {"layout": self.layout_record(), "config": self.cfg.to_dict()}}
        pending = checkpoint.save_checkpoint(self.cfg.train.save_dir, self.step, self.checkpoint_pieces(), state, extra, async_save)
        if async_save:
            self._pending_save = pending
            return pending.path
        return pending.finish()

    def finish_save(self) -> None:
        """Collective: publish an asynchronous save still in flight (no-op without one)."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            pending.finish()

    def load(self, load_dir: str) -> dict:
        """Load the latest checkpoint of ``load_dir``, saved under this or any other layout.

        Weights, optimizer state (a fresh optimizer when the checkpoint holds weights only, e.g.
        one converted from Hugging Face), step and data position; RNG states when this rank saved
        some. Returns ``{"step", "consumed_samples", **extra}`` with the ``extra`` this rank saved.
        """
        ckpt = checkpoint.open_checkpoint(load_dir)
        ckpt.read(checkpoint.model_pieces(self.chunks, self.ps))
        if ckpt.has("optim/"):
            ckpt.read(checkpoint.optimizer_pieces(self.optimizer, self.chunks, self.ps))
            self.optimizer.step_count = ckpt.manifest["optimizer"]["step"]
        else:
            self.optimizer.sync_master_from_params()
        trainer_state = ckpt.manifest.get("trainer", {"step": ckpt.step, "consumed_samples": 0})
        self.step, self.consumed_samples = trainer_state["step"], trainer_state["consumed_samples"]
        checkpoint.restore_rng(ckpt, self.ps.rank)
        return {**trainer_state, **ckpt.extra(self.ps.rank)}

    # ------------------------------------------------------------------ loop
    def fit(self, batches: Iterator, logger: Optional[MetricsLogger] = None, progress: bool = True) -> dict:
        """Train until ``train.steps``; returns the last step's metrics.

        ``batches`` yields this rank's share of each global batch as ``[B, S+1]`` tokens
        or as a ready micro-batch dict.
        """
        t = self.cfg.train
        flops_token = flops_per_token(self.cfg.model, t.seq_len)
        peak = peak_flops(t.peak_tflops) * self.ps.layout.world
        bar = progress_bar(t.steps, self.step, progress and self.is_logging_rank)
        last: dict = {}
        window_start, window_tokens = time.perf_counter(), 0.0
        try:
            while self.step < t.steps:
                raw = next(batches)
                batch = lm_batch(raw) if isinstance(raw, torch.Tensor) else raw
                try:
                    last = self.train_step(batch)
                except (NonFiniteLossError, NonFiniteGradError) as e:
                    latest = checkpoint.latest_checkpoint(t.save_dir)
                    raise NonFiniteLossError(
                        f"stopped at step {self.step}: {e}; parameters were not updated; "
                        f"last good checkpoint: {latest or 'none saved yet'}"
                    ) from e
                window_tokens += t.global_batch_size * t.seq_len
                bar.update(1)
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    last["tokens_per_s"] = window_tokens / elapsed
                    last["mfu"] = last["tokens_per_s"] * flops_token / peak
                    if logger is not None and self.is_logging_rank:
                        logger.log(self.step, last, write=bar.write)
                    window_start, window_tokens = time.perf_counter(), 0.0
                if t.save_interval and self.step % t.save_interval == 0:
                    self.save(async_save=t.async_save)
            self.finish_save()
        finally:
            bar.close()
        return last


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """A tqdm bar (``update``, ``write``, ``close``), or one that only prints when not ``enabled``."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
