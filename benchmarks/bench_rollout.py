"""Rollout speed: our KV-cache engine (fp32 and ``rollout.dtype=bf16``) vs Hugging Face ``generate``
(eager and static KV cache) on the same Qwen3-MoE weights.

Every column generates ``--new-tokens`` greedy tokens (no stop token) for batches of ``--prompt-len``
random prompts; the HF model is ``Qwen3MoeForCausalLM`` built from ``hf_config(...)`` and
loaded with our weights through the converter, so the work is identical. Columns:

* ``ours fp32`` / ``ours bf16``: :class:`rl.rollout.engine.RolloutEngine` at ``rollout.dtype``
  fp32 / bf16 (decode steps compiled with ``--compile``, ``rollout.compile=true``);
* ``HF eager``: plain ``generate`` (its DynamicCache), as users run it;
* ``HF static``: ``generate(cache_implementation="static")``, HF's pre-allocated cache;
* ``HF static compiled`` (``--hf-compile``): the same with its forward compiled, which
  transformers does by itself on cuda only (:func:`hf_static_compiled` asks for it on CPU).

Each column's first call at each batch size is an untimed warm-up (compilations happen
there; its time is printed), then ``--repeats`` rounds run the columns interleaved and
each keeps its median. Ratios are against HF's fastest static-cache column. "same as ours
fp32" counts the generated positions whose token equals ``ours fp32``'s (bf16 vs fp32
agreement; HF vs ours). "roofline" is the fraction of the copy bandwidth the decode step
reaches: (bytes of weights and KV the step reads, :func:`decode_step_bytes`) / (median CPU
time / new tokens, prefill included) against a one-thread tensor copy measured in the same run
(:func:`copy_bandwidth`, CPU time too). Throughput is per second of wall time and per second of this
process's CPU time: on a shared, loaded machine the CPU-time figure is the stable one. Run
it pinned to one core (``taskset -c 1``) with ``--threads 1``; the load average is printed.

The process runs with the stack's host-allocator setting (:mod:`megatron_seed.host_allocator`,
as the ``megatron-seed`` command does: freed memory stays in glibc's heap, so steps do not
page-fault their fresh tensors) unless ``--glibc-malloc-defaults``; it applies to every column.

Two model sizes (``--model``, default both): ``bench``, the script's own shape (hidden 256,
16 experts top-4, vocab 4096), and ``tiny``, the ``tiny`` preset (``configs/tiny.yaml``:
hidden 128, 8 experts top-2, vocab 2048) without its shared expert, which Qwen3-MoE lacks.

``--device cuda`` runs every column on the GPU (``benchmarks/gpu_check.sh`` runs it so); the
CPU-time columns then count the host's launch work only.

    taskset -c 1 .venv/bin/python benchmarks/bench_rollout.py [--model bench tiny] [--batches 1 16] [--new-tokens 128] [--repeats 3] [--threads 1] [--compile] [--hf-compile] [--device cpu] [--glibc-malloc-defaults]
"""
from __future__ import annotations

import argparse
import os
import statistics
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
def time_hf(hf, prompts: list, new_tokens: int, **generate_kwargs) -> tuple:
    ids = torch.tensor(prompts, device=hf.device)
    with Clock() as clock:
        out = hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0, **generate_kwargs,
        )
    return clock, out[:, ids.shape[1]:].tolist()


def hf_static_compiled() -> dict:
    """``generate`` kwargs of HF's static cache with its forward compiled: transformers compiles it by itself on
    cuda only; ``CompileConfig._compile_all_devices`` (its documented testing switch) asks for it on CPU too."""
    from transformers import CompileConfig

    config = CompileConfig(dynamic=False)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def sides(ours: GPTModel, hf, ps: ParallelState, args: argparse.Namespace) -> dict:
    """name -> generate(prompts) of each column: ours at fp32 and bf16 (``rollout.dtype``), HF eager and static-cache."""
    engines = {dtype: RolloutEngine(ours, ps, RolloutConfig(kv_cache_budget_mb=1024, compile=args.compile, dtype=dtype),
                                    stop_ids=[], pad_id=0) for dtype in ("fp32", "bf16")}
    out = {f"ours {dtype}": (lambda p, e=e: time_ours(e, p, args.new_tokens)) for dtype, e in engines.items()}
    out["ours bf16"].model = engines["bf16"].policy  # the bf16 copy, for the teacher-forced agreement
    out["HF eager"] = lambda p: time_hf(hf, p, args.new_tokens)
    out["HF static"] = lambda p: time_hf(hf, p, args.new_tokens, cache_implementation="static")
    if args.hf_compile:
        out["HF static compiled"] = lambda p, kw=hf_static_compiled(): time_hf(hf, p, args.new_tokens, **kw)
    return out


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes per CPU second one thread moves in a ``mb`` MiB tensor copy (read + write counted: 2 x size / time), median
    (CPU time, like the decode step it is compared with: on a shared core other processes' turns are not counted)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        dst.copy_(src)
        times.append(time.process_time() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def decode_step_bytes(m: ModelConfig, model: GPTModel, batch: int, cache_len: float, element: int) -> float:
    """Bytes one decode step of ``batch`` rows reads: every non-expert weight but the embedding table, one embedding
    row per token, the experts a batch routes to (expected under uniform routing: ``E (1 - (1 - k/E)^B)`` of ``E``)
    and the K/V of ``cache_len`` cached tokens per row, at ``element`` bytes a number."""
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    table = model.embed_tokens.weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - expert - table
    hit = 1 - (1 - m.moe.top_k / m.moe.num_experts) ** batch
    kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim + 1  # k, v of every layer + the slot's attention bias
    return element * (dense + batch * m.hidden_size + expert * hit + batch * cache_len * kv_per_token)


def run_model(name: str, args: argparse.Namespace, bandwidth: float) -> None:
    """Print one table per model: median tok/s of each column per batch size, ratios vs HF's static-cache path,
    bf16-vs-fp32 greedy agreement and the decode step's fraction of the copy bandwidth."""
    m = model_config(name)
    ps = ParallelState.single(device=args.device)
    ours, hf = build_models(m, 0, ps)
    columns = sides(ours, hf, ps, args)
    print(f"model {name}: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads}/{m.num_kv_heads} heads, "
          f"{m.moe.num_experts} experts top-{m.moe.top_k} (ffn {m.moe.ffn_size}), vocab {m.vocab_size}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.threads} thread(s), median of {args.repeats} "
          f"interleaved; ours: rollout.compile={args.compile}")
    gen = torch.Generator().manual_seed(1)
    for batch in args.batches:
        prompts = torch.randint(4, m.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
        first = {side: fn(prompts)[0].wall for side, fn in columns.items()}  # warm-up (compilation happens here)
        walls: dict = {side: [] for side in columns}
        cpus: dict = {side: [] for side in columns}
        tokens: dict = {}
        for _ in range(args.repeats):
            for side, fn in columns.items():
                clock, tokens[side] = fn(prompts)
                walls[side].append(clock.wall)
                cpus[side].append(clock.cpu)
        n = batch * args.new_tokens
        wall = {side: statistics.median(v) for side, v in walls.items()}
        cpu = {side: statistics.median(v) for side, v in cpus.items()}
        static = min((side for side in columns if side.startswith("HF static")), key=wall.get)  # HF's fastest static-cache path
        print(f"batch {batch} (load average {os.getloadavg()[0]:.2f}); ratios vs {static!r}")
        print(f"  {'column':<19} {'wall tok/s':>10} {'CPU tok/s':>10} {'wall ratio':>10} {'CPU ratio':>9} {'same as ours fp32':>17} "
              f"{'roofline':>8} {'first call':>10}")
        for side in columns:
            element = 2 if side == "ours bf16" else 4
            roofline = ""
            if side.startswith("ours"):
                step_bytes = decode_step_bytes(m, ours, batch, args.prompt_len + args.new_tokens / 2, element)
                roofline = f"{step_bytes / (cpu[side] / args.new_tokens) / bandwidth:.1%}"
            same = agreement(tokens[side], tokens["ours fp32"])
            print(f"  {side:<19} {n / wall[side]:>10.1f} {n / cpu[side]:>10.1f} {wall[static] / wall[side]:>9.2f}x "
                  f"{cpu[static] / cpu[side]:>8.2f}x {same:>17.1%} {roofline:>8} {first[side]:>9.1f}s")
        forced = teacher_forced_agreement(columns["ours bf16"].model, prompts, tokens["ours fp32"])
        print(f"  bf16 vs fp32 greedy tokens: {agreement(tokens['ours bf16'], tokens['ours fp32']):.1%} of positions free-running "
              f"(a first difference changes the rest of the row), {forced:.1%} teacher-forced (bf16's argmax on fp32's sequence)")


@torch.no_grad()
def teacher_forced_agreement(model: GPTModel, prompts: list, responses: list) -> float:
    """Fraction of response positions where ``model``'s argmax, given the sequence so far (prompt + ``responses``),
    is the token ``responses`` holds there."""
    ids_BS = torch.tensor([p + r for p, r in zip(prompts, responses)], device=next(model.parameters()).device)
    P = len(prompts[0])  # the bench's prompts all have --prompt-len tokens
    predicted_BR = model(ids_BS)[:, P - 1:-1].argmax(dim=-1)
    return float((predicted_BR == ids_BS[:, P:]).float().mean())


def agreement(a: list, b: list) -> float:
    """Fraction of generated positions where two token-row lists agree."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=["bench", "tiny"], default=["bench", "tiny"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="our decode steps through torch.compile (rollout.compile=true)")
    parser.add_argument("--hf-compile", action="store_true", help="add HF's static-cache generate with its forward compiled")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both models generate")
    parser.add_argument("--glibc-malloc-defaults", action="store_true", help="leave glibc's mmap/trim thresholds as they are")
    args = parser.parse_args()
    Clock.device = torch.device(args.device)
    heap = "glibc defaults" if args.glibc_malloc_defaults or not keep_freed_memory_in_heap() else "freed memory kept in the heap"
    where = torch.cuda.get_device_name(Clock.device) if Clock.device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {where}, host allocator: {heap}")
    torch.set_num_threads(args.threads)
    # every engine compiles the same decode function; this one process holds 2 dtypes x 2 model sizes of it, 2-3 graphs
    # each, past dynamo's default of 8 graphs per function (beyond which it would silently decode eagerly)
    torch._dynamo.config.recompile_limit = 64
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth ({args.threads} thread(s), 256 MiB tensor copy, read + write per CPU second): {bandwidth / 1e9:.2f} GB/s; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in args.model:
        run_model(name, args, bandwidth)


if __name__ == "__main__":
    main()
