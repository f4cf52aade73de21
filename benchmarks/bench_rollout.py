"""Rollout speed: our KV-cache engine vs Hugging Face ``generate`` on the same Qwen3-MoE weights.

Both generate ``--new-tokens`` greedy tokens (no stop token) for batches of ``--prompt-len``
random prompts on CPU; the HF model is ``Qwen3MoeForCausalLM`` built from
``hf_config(...)`` and loaded with our weights through the converter, so the work is
identical (the script also reports how many generated tokens agree). Runs are
interleaved and each side keeps its best of ``--repeats``. Both sides run on one thread
by default, and throughput is reported per second of wall time and per second of this
process's CPU time: on a shared, loaded machine the CPU-time figure is the stable one
(other processes' load stretches wall time, not the CPU time our thread uses).

The process runs with the stack's host-allocator setting (:mod:`megatron_seed.host_allocator`,
as the ``megatron-seed`` command does: freed memory stays in glibc's heap, so steps do not
page-fault their fresh tensors) unless ``--glibc-malloc-defaults``; it applies to both sides.

``--compile`` runs our decode steps through ``torch.compile`` (``rollout.compile=true``); HF
``generate`` runs as users run it (eager). Each side's first call at each batch size is an
untimed warm-up (our compilation happens there; its time is printed).

Two model sizes (``--model``, default both): ``bench``, the script's own shape (hidden 256,
16 experts top-4, vocab 4096), and ``tiny``, the ``tiny`` preset (``configs/tiny.yaml``:
hidden 128, 8 experts top-2, vocab 2048) without its shared expert, which Qwen3-MoE lacks.

``--device cuda`` runs both on the GPU (``benchmarks/gpu_check.sh`` runs it so); the CPU-time
columns then count the host's launch work only.

    .venv/bin/python benchmarks/bench_rollout.py [--model bench tiny] [--batches 1 16] [--new-tokens 128] [--threads 1] [--compile] [--device cpu] [--glibc-malloc-defaults]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from megatron_seed.config import MoEConfig, ModelConfig, RolloutConfig, load_config
from megatron_seed.convert.hf import save_hf_checkpoint
from megatron_seed.host_allocator import keep_freed_memory_in_heap
from megatron_seed.model.gpt import GPTModel
from megatron_seed.parallel.state import ParallelState
from rl.rollout.engine import RolloutEngine
from rl.rollout.sampling import SamplingParams

MODEL = ModelConfig(
    vocab_size=4096, hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=4, head_dim=32,
    max_seq_len=512, moe=MoEConfig(num_experts=16, top_k=4, ffn_size=256),
)


def model_config(name: str) -> ModelConfig:
    """``bench`` (:data:`MODEL`) or ``tiny`` (the preset as Qwen3-MoE: shared expert removed, softmax routing)."""
    if name == "bench":
        return MODEL
    return load_config("tiny", overrides=["model.moe.num_shared_experts=0", "model.moe.score_function=softmax"]).model


def build_models(cfg: ModelConfig, seed: int, ps: ParallelState) -> tuple:
    """Our model and HF's with the same weights, both on ``ps.device``."""
    from transformers import Qwen3MoeForCausalLM

    ours = GPTModel(cfg, ps).eval()
    ours.init_weights(seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(ours.state_dict(), cfg, tmp)
        hf = Qwen3MoeForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return ours.to(ps.device), hf.to(ps.device)


class Clock:
    """Wall and process-CPU seconds of a block (on cuda, until its queued kernels are done)."""

    device = torch.device("cpu")

    def __enter__(self) -> "Clock":
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def time_ours(engine: RolloutEngine, prompts: list, new_tokens: int) -> tuple:
    with Clock() as clock:
        out = engine.generate(prompts, n=1, sampling=SamplingParams(temperature=0.0), max_new_tokens=new_tokens)
    return clock, out.responses()


@torch.no_grad()
def time_hf(hf, prompts: list, new_tokens: int) -> tuple:
    ids = torch.tensor(prompts, device=hf.device)
    with Clock() as clock:
        out = hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
        )
    return clock, out[:, ids.shape[1]:].tolist()


def run_model(name: str, args: argparse.Namespace) -> None:
    """Print one table: tokens/s of ours and HF per batch size, for model ``name``."""
    m = model_config(name)
    ps = ParallelState.single(device=args.device)
    ours, hf = build_models(m, 0, ps)
    rollout = RolloutConfig(kv_cache_budget_mb=1024, compile=args.compile)
    engine = RolloutEngine(ours, ps, rollout, stop_ids=[], pad_id=0)
    print(f"model {name}: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads}/{m.num_kv_heads} heads, "
          f"{m.moe.num_experts} experts top-{m.moe.top_k} (ffn {m.moe.ffn_size}), vocab {m.vocab_size}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.threads} thread(s), best of {args.repeats}; "
          f"ours: rollout.compile={rollout.compile}, HF: eager generate")
    print(f"{'batch':>5} | {'wall tok/s: ours':>16} {'HF':>7} {'ratio':>6} | {'CPU tok/s: ours':>15} {'HF':>7} {'ratio':>6} | same tokens | ours' first call")
    gen = torch.Generator().manual_seed(1)
    for batch in args.batches:
        prompts = torch.randint(4, m.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
        first, _ = time_ours(engine, prompts, args.new_tokens)  # warm-up (compiles with --compile)
        time_hf(hf, prompts, args.new_tokens)
        best = {"ours": [float("inf")] * 2, "hf": [float("inf")] * 2}
        outputs = {}
        for _ in range(args.repeats):
            for side, fn, model in (("ours", time_ours, engine), ("hf", time_hf, hf)):
                clock, toks = fn(model, prompts, args.new_tokens)
                best[side] = [min(best[side][0], clock.wall), min(best[side][1], clock.cpu)]
                outputs[side] = toks
        same = sum(a == b for ra, rb in zip(outputs["ours"], outputs["hf"]) for a, b in zip(ra, rb)) / (batch * args.new_tokens)
        n = batch * args.new_tokens
        (wo, co), (wh, ch) = best["ours"], best["hf"]
        print(f"{batch:>5} | {n / wo:>16.1f} {n / wh:>7.1f} {wh / wo:>5.2f}x | {n / co:>15.1f} {n / ch:>7.1f} {ch / co:>5.2f}x | {same:>11.1%} | {first.wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=["bench", "tiny"], default=["bench", "tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="our decode steps through torch.compile (rollout.compile=true)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both models generate")
    parser.add_argument("--glibc-malloc-defaults", action="store_true", help="leave glibc's mmap/trim thresholds as they are")
    args = parser.parse_args()
    Clock.device = torch.device(args.device)
    heap = "glibc defaults" if args.glibc_malloc_defaults or not keep_freed_memory_in_heap() else "freed memory kept in the heap"
    where = torch.cuda.get_device_name(Clock.device) if Clock.device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {where}, host allocator: {heap}")
    torch.set_num_threads(args.threads)
    for name in args.model:
        run_model(name, args)


if __name__ == "__main__":
    main()
