"""Code-sandbox throughput: trivial test cases per second, isolated vs plain subprocess, and A/B against a checkout.

All sides run the same program (read an int, print its double; or ``double(i)`` defined
and called by an assert) with the same interpreter flags (``python -I -S``) and the same number of
parallel workers:
- reward stdin / reward assert: ``CodeReward.score`` on programs of
  ``--cases-per-program`` stdin/stdout or function-call (``assert``) tests, programs in
  parallel: what the RL loop pays per test case;
- per-case: ``Sandbox.run_many``, a fresh sandbox for every case;
- reference: plain ``subprocess.run`` per case, no isolation, limits or uid drop.

``--compare DIR`` measures the two reward rows of the checkout at ``DIR`` (e.g.
``git archive <commit> | tar -x -C DIR``) and of this one in alternating subprocesses,
``--rounds`` times, and prints this/that ratios: a side-by-side A/B in one run.

    .venv/bin/python benchmarks/bench_sandbox.py --cases 400 --workers 2
    .venv/bin/python benchmarks/bench_sandbox.py --cases 400 --workers 2 --compare /tmp/before --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = "print(int(input()) * 2)\n"
FUNCTION = "def double(x):\n    return 2 * x\n"  # for the assert tests (the old harness ran them as __main__)


def bench_reward(reward, cases: int, per_program: int, kind: str) -> float:
    """Cases per second through ``CodeReward.score``; every program must pass every test."""
    from rl.rewards.base import ScoringSample

    def tests(start: int) -> list:
        ids = range(start, min(start + per_program, cases))
        if kind == "assert":
            return [{"assert": f"assert double({i}) == {2 * i}"} for i in ids]
        return [{"input": f"{i}\n", "output": f"{2 * i}\n"} for i in ids]

    program = FUNCTION if kind == "assert" else PROGRAM
    samples = [ScoringSample(response=program, tests=tests(p), domain="code") for p in range(0, cases, per_program)]
    start = time.perf_counter()
    with ThreadPoolExecutor(reward.sandbox.workers) as pool:
        results = list(pool.map(reward.score, samples))
    elapsed = time.perf_counter() - start
    bad = [r for r in results if not r.correct]
    if bad:
        raise SystemExit(f"reward ({kind}) failed a right program: {bad[0]}")
    return cases / elapsed


def bench_per_case(sandbox, cases: int) -> float:
    jobs = [(PROGRAM, f"{i}\n") for i in range(cases)]
    start = time.perf_counter()
    results = sandbox.run_many(jobs)
    elapsed = time.perf_counter() - start
    bad = [i for i, r in enumerate(results) if r.stdout.strip() != str(2 * i)]
    if bad:
        raise SystemExit(f"sandbox gave wrong results for cases {bad[:5]}: {results[bad[0]]}")
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


def build_reward(args):
    from rl.rewards.code_reward import CodeReward, CodeRewardConfig
    from rl.rewards.sandbox import SandboxLimits

    return CodeReward(CodeRewardConfig(workers=args.workers, limits=SandboxLimits(), isolation=args.isolation))


def reward_rates(args) -> dict:
    reward = build_reward(args)
    bench_reward(reward, 4 * args.workers, args.cases_per_program, "stdin")  # warm-up: page cache, probe
    return {"stdin": bench_reward(reward, args.cases, args.cases_per_program, "stdin"),
            "assert": bench_reward(reward, args.cases, args.cases_per_program, "assert")}


def compare(args) -> None:
    """Alternate subprocesses measuring this checkout and ``args.compare``; print per-round and median ratios."""
    argv = [sys.executable, os.path.abspath(__file__), "--rewards-json", "--cases", str(args.cases), "--workers",
            str(args.workers), "--cases-per-program", str(args.cases_per_program), "--isolation", args.isolation]
    rows = {"this": [], "that": []}
    for _ in range(args.rounds):
        for side, root in (("that", args.compare), ("this", REPO)):
            out = subprocess.run(argv + ["--import-from", root], capture_output=True, text=True, check=True).stdout
            rows[side].append(json.loads(out.strip().splitlines()[-1]))
    for kind in ("stdin", "assert"):
        this = [r[kind] for r in rows["this"]]
        that = [r[kind] for r in rows["that"]]
        ratios = sorted(a / b for a, b in zip(this, that))
        print(f"reward {kind:6s}  this: {' '.join(f'{x:.0f}' for x in this)} cases/s   that ({args.compare}): "
              f"{' '.join(f'{x:.0f}' for x in that)} cases/s   this/that per round: "
              f"{' '.join(f'{x:.2f}' for x in ratios)} (median {ratios[len(ratios) // 2]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cases-per-program", type=int, default=10)
    parser.add_argument("--isolation", default="auto", choices=["auto", "bubblewrap", "rlimits-only"])
    parser.add_argument("--compare", default=None, help="a checkout to A/B the reward rows against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--import-from", default=REPO, help=argparse.SUPPRESS)
    parser.add_argument("--rewards-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, args.import_from)
    if args.rewards_json:
        print(json.dumps(reward_rates(args)))
        return
    if args.compare:
        compare(args)
        return
    rates = reward_rates(args)
    sandbox = build_reward(args).sandbox
    per_case = bench_per_case(sandbox, args.cases)
    plain = bench_plain(sandbox.python, args.cases, args.workers)
    print(f"isolation={sandbox.isolation} uid_drop={sandbox.drops_uid} workers={args.workers} cpus={os.cpu_count()} "
          f"cases={args.cases} cases/program={args.cases_per_program}")
    print(f"reward stdin: {rates['stdin']:.0f} cases/s   reward assert: {rates['assert']:.0f} cases/s   "
          f"sandbox per-case: {per_case:.0f} cases/s   plain subprocess: {plain:.0f} cases/s")
    print(f"ratio reward-stdin/plain: {rates['stdin'] / plain:.2f}   reward-assert/plain: {rates['assert'] / plain:.2f}   "
          f"per-case/plain: {per_case / plain:.2f}")


if __name__ == "__main__":
    main()
