"""Run a function on N local processes over gloo: the CPU stand-in for N GPUs.

Used by every multi-process test and the CPU benchmarks. Each worker is forked from a
forkserver that has imported torch and nothing else (importing torch is most of a
worker's start-up; the server runs no op, so no thread pool or lock is copied), gets the
caller's environment, one torch thread, and a process group on a free port. If any
rank fails, the others are killed and the failing rank's traceback is raised, so a
broken test never hangs waiting on a peer that died.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj: Any) -> bytes:
    """Serialise a result by value: tensors sent through a Queue travel as shared-memory
    handles that break when the worker exits first."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any, timeout_s: float,
            environ: dict) -> None:
    torch.set_num_threads(1)
    os.environ.clear()  # the server's environment is the one it started with, not the caller's now
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        out = fn(rank, world, *args)
        results.put((rank, "ok", _to_bytes(out)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)


def run_distributed(fn: Callable, world: int, *args: Any, timeout_s: float = 200.0) -> list:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo processes; return results by rank.

    ``fn`` must be importable (module level) and return something picklable.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    results = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, results, timeout_s, environ), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    outputs: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                # a rank that died without reporting (segfault, OOM kill) must not leave us waiting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:
                    raise WorkerError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without reporting") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"no result from ranks {sorted(set(range(world)) - set(outputs))} within {timeout_s}s") from None
                continue
            if status == "error":
                raise WorkerError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return [outputs[r] for r in range(world)]
