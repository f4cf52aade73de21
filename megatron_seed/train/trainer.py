"""The training loop shared by pretraining and SFT (and reused by RL's updates).

One step: split the rank's share of the global batch into micro-batches, normalise
the loss by the global number of loss tokens (all ranks, all micro-batches), run the
pipeline schedule's forward/backward, then reduce, clip and update with
:class:`DistributedOptimizer`. Micro-batch keys: ``input_ids_BS``, ``labels_BS``,
``loss_mask_BS`` (float), optionally ``position_ids_BS`` and ``doc_ids_BS`` (packing).

A NaN/Inf loss or gradient norm stops the run before the update, saying at which
step; the last checkpoint written stays the latest.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Iterator, Optional

import torch

from megatron_seed.config import Config, ConfigError, save_config
from megatron_seed.model.build import build_model_chunks
from megatron_seed.parallel.mappings import all_reduce_no_grad
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
        "loss_mask_BS": torch.ones(tokens_BS1.shape[0], tokens_BS1.shape[1] - 1),
    }


def lm_loss_fn(ps: ParallelState, normaliser: float) -> Callable:
    """Sum of masked NLL over the micro-batch / ``normaliser`` (global loss tokens)."""

    def loss_fn(logits_BSV: torch.Tensor, mb: dict) -> tuple:
        nll_BS = -vocab_parallel_log_probs(logits_BSV, mb["labels_BS"], ps)
        nll_sum = (nll_BS * mb["loss_mask_BS"]).sum()
        return nll_sum / normaliser, {"nll_sum": nll_sum.detach(), "tokens": mb["loss_mask_BS"].sum()}

    return loss_fn


def autocast_context(dtype: str):
    """bf16 autocast on GPU (``auto`` or ``bfloat16``); fp32 on CPU."""
    if torch.cuda.is_available() and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Trainer:
    """Owns the model chunks, optimizer and step counter of one rank."""

    def __init__(self, cfg: Config, ps: ParallelState, chunks: Optional[list] = None):
        if cfg.parallel.cp > 1:
            raise ConfigError("parallel.cp > 1: context parallelism is not implemented yet; fix: set parallel.cp=1")
        self.cfg, self.ps = cfg, ps
        torch.manual_seed(cfg.train.seed)
        self.chunks = chunks if chunks is not None else build_model_chunks(cfg.model, cfg.parallel, ps, cfg.train.seed)
        self.optimizer = build_optimizer(self.chunks, cfg.train, ps, cfg.parallel.zero1, cfg.parallel.overlap_grad_reduce)
        self.step = 0
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

    def lr(self) -> float:
        t = self.cfg.train
        return lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.steps)

    def global_sum(self, value: torch.Tensor, group: str = "dp_cp") -> torch.Tensor:
        return all_reduce_no_grad(value.detach().clone().double(), self.ps.group(group))

    def train_step(self, batch: dict, loss_fn_factory: Callable = lm_loss_fn) -> dict:
        """One optimizer step on this rank's share of the global batch (a dict of ``[B, ...]``)."""
        microbatches = split_microbatches(batch, self.cfg.train.micro_batch_size)
        tokens = self.global_sum(batch["loss_mask_BS"].sum())
        normaliser = max(1.0, tokens.item())
        stats = self.forward_backward(microbatches, loss_fn_factory(self.ps, normaliser))
        nll = torch.stack([s["nll_sum"] for s in stats]).sum() if stats else torch.zeros(())
        # the loss lives on the last pipeline stage; share it so every rank can stop together
        loss = self.global_sum(nll, "dp_cp")
        if self.ps.pp_size > 1:
            loss = all_reduce_no_grad(loss, self.ps.group("pp"))
        loss = loss.item() / normaliser
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {self.step}")
        grad_norm, lr = self.optimizer_step()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": normaliser, **self.moe_stats()}

    def forward_backward(self, microbatches: list, loss_fn: Callable) -> list:
        """Zero the gradients, then accumulate those of ``loss_fn`` over ``microbatches`` (no update).

        ``loss_fn(output, microbatch) -> (loss, stats)`` must return each micro-batch's
        share of the global loss (RL builds its own, see ``rl/ppo.py``). Returns the
        stats of the last pipeline stage.
        """
        for m in self.chunks:
            m.train()
            m.set_aux_loss_scale(1.0 / (len(microbatches) * self.ps.dp_size))
        self.optimizer.zero_grad()
        self.optimizer.expect_backward_passes(len(microbatches))  # dp all-reduce overlaps the last one
        with autocast_context(self.cfg.train.dtype):
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
        aux = [float(m.last_stats["aux_loss"]) for m in layers if m.last_stats.get("aux_loss") is not None]
        total = all_reduce_no_grad(torch.tensor([sum(aux), len(aux)], dtype=torch.float64), self.ps.group("pp"))
        return {"moe_aux_loss": float(total[0] / total[1])} if total[1] else {}

    # ------------------------------------------------------------------ checkpoints
    def layout_record(self) -> dict:
        l = self.ps.layout
        return {"world": l.world, "tp": l.tp, "pp": l.pp, "dp": l.dp, "ep": l.ep, "etp": l.etp, "cp": l.cp, "virtual_pp": self.cfg.parallel.virtual_pp}

    def save(self, extra: Optional[dict] = None) -> str:
        state = {
            "model": [m.state_dict() for m in self.chunks],
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "rng": torch.get_rng_state(),
            **(extra or {}),
        }
        meta = {"layout": self.layout_record(), "config": self.cfg.to_dict()}
        path = checkpoint.save_checkpoint(self.cfg.train.save_dir, self.step, state, self.ps.rank, meta)
        if self.ps.rank == 0:
            save_config(self.cfg, f"{path}/config.yaml")
        return path

    def load(self, load_dir: str) -> dict:
        _, state = checkpoint.load_checkpoint(load_dir, self.ps.rank, self.layout_record())
        for m, s in zip(self.chunks, state["model"]):
            m.load_state_dict(s)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # weights only (e.g. converted from Hugging Face): a fresh optimizer
            self.optimizer.sync_master_from_params()
        self.step, self.consumed_samples = state["step"], state["consumed_samples"]
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        return state

    # ------------------------------------------------------------------ loop
    def fit(self, batches: Iterator, logger: Optional[MetricsLogger] = None, progress: bool = True) -> dict:
        """Train until ``train.steps``; returns the last step's metrics.

        ``batches`` yields this rank's share of each global batch as ``[B, S+1]`` tokens
        or as a ready micro-batch dict.
        """
        t = self.cfg.train
        flops_token = flops_per_token(self.cfg.model, t.seq_len)
        peak = peak_flops(t.peak_tflops) * self.ps.layout.world
        bar = _progress(t.steps, self.step, progress and self.is_logging_rank)
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
                    self.save()
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


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=False)
