"""What every command that trains or samples does first: join the job's process groups and load
the tokenizer the model is sized for."""
from __future__ import annotations

import os

import torch

from data.tokenizer import Tokenizer, load_tokenizer
from megatron_seed.config import Config, ConfigError
from megatron_seed.parallel.state import ParallelState, init_distributed


def start_run(cfg: Config) -> ParallelState:
    """Join the launcher's job (torchrun / SLURM; none means one process) and build every group of
    ``cfg.parallel``. A lone CPU process uses every core (torch's default may be fewer) unless
    ``OMP_NUM_THREADS`` says otherwise: processes sharing the cores must not each run a thread per
    core, or their spinning threads wait on each other (a step became tens of times slower)."""
    rank, world = init_distributed(cfg.parallel.backend)
    ps = ParallelState.build(cfg.parallel, world, rank)
    if not torch.cuda.is_available() and world == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return ps


def load_run_tokenizer(cfg: Config) -> Tokenizer:
    """``cfg.data.tokenizer``, refused when its vocabulary does not fit ``model.vocab_size``."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
                          "fix: raise model.vocab_size")
    return tokenizer
