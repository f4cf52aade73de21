"""Code-sandbox throughput: trivial test cases per second, isolated vs plain subprocess.

All sides run the same program (read an int, print its double) with the same
interpreter flags (``python -I -S``) and the same number of parallel workers:
- batched: ``Sandbox.run_cases``, one sandbox per program with ``--cases-per-program``
  cases (what :class:`CodeReward` does), programs in parallel;
- per-case: ``Sandbox.run``, a fresh sandbox for every case;
- reference: plain ``subprocess.run`` per case, no isolation, limits or uid drop.

    .venv/bin/python benchmarks/bench_sandbox.py --cases 400 --workers 2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rl.rewards.sandbox import Sandbox, SandboxLimits  # noqa: E402

PROGRAM = "print(int(input()) * 2)\n"


def bench_sandbox(sandbox: Sandbox, cases: int) -> float:
    jobs = [(PROGRAM, f"{i}\n") for i in range(cases)]
    start = time.perf_counter()
    results = sandbox.run_many(jobs)
    elapsed = time.perf_counter() - start
    bad = [i for i, r in enumerate(results) if r.stdout.strip() != str(2 * i)]
    if bad:
        raise SystemExit(f"sandbox gave wrong results for cases {bad[:5]}: {results[bad[0]]}")
    return cases / elapsed


def bench_batched(sandbox: Sandbox, cases: int, per_program: int) -> float:
    programs = [[(f"{i}\n", "") for i in range(p, min(p + per_program, cases))] for p in range(0, cases, per_program)]
    start = time.perf_counter()
    with ThreadPoolExecutor(sandbox.workers) as pool:
        results = [r for runs in pool.map(lambda c: sandbox.run_cases(PROGRAM, c), programs) for r in runs]
    elapsed = time.perf_counter() - start
    bad = [i for i, r in enumerate(results) if r.stdout.strip() != str(2 * i)]
    if bad:
        raise SystemExit(f"batched sandbox gave wrong results for cases {bad[:5]}: {results[bad[0]]}")
    return cases / elapsed


def bench_plain(python: str, cases: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "main.py")
        with open(path, "w") as f:
            f.write(PROGRAM)

        def one(i: int) -> str:
            return subprocess.run([python, "-I", "-S", path], input=f"{i}\n", capture_output=True, text=True).stdout

        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            outs = list(pool.map(one, range(cases)))
        elapsed = time.perf_counter() - start
    if any(o.strip() != str(2 * i) for i, o in enumerate(outs)):
        raise SystemExit("plain subprocess gave wrong results")
    return cases / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cases-per-program", type=int, default=10)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bubblewrap", "rlimits-only"])
    args = parser.parse_args()
    sandbox = Sandbox(SandboxLimits(), workers=args.workers, isolation=args.isolation)
    bench_sandbox(sandbox, 2 * args.workers)  # warm-up: page cache, probe
    batched = bench_batched(sandbox, args.cases, args.cases_per_program)
    per_case = bench_sandbox(sandbox, args.cases)
    plain = bench_plain(sandbox.python, args.cases, args.workers)
    print(f"isolation={sandbox.isolation} uid_drop={sandbox.drops_uid} workers={args.workers} cpus={os.cpu_count()} "
          f"cases={args.cases} cases/program={args.cases_per_program}")
    print(f"sandbox batched: {batched:.0f} cases/s   sandbox per-case: {per_case:.0f} cases/s   "
          f"plain subprocess: {plain:.0f} cases/s")
    print(f"ratio batched/plain: {batched / plain:.2f}   ratio per-case/plain: {per_case / plain:.2f}")


if __name__ == "__main__":
    main()
