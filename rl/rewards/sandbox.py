"""Run untrusted Python programs in isolation, with resource limits and a bounded pool.

Isolation, strongest available (reported once at start and in :attr:`Sandbox.isolation`):

``"bubblewrap"`` (``bwrap`` works here)
    New network, pid, ipc, uts (and cgroup) namespaces: no network at all, no view of
    host processes, and every process of the run dies with it (the pid namespace is torn
    down when the program exits, so background processes cannot outlive it). The file
    system is an empty root with read-only binds of ``/usr`` (and the ``/lib*``, ``/bin``
    links) and of the Python install only, a private ``/tmp`` and a size-capped tmpfs
    work dir ``/sandbox`` holding the program and its input files read-only.
``"rlimits-only"`` (no working ``bwrap``)
    The program runs in a fresh temp dir with its own session/process group and the
    limits below, but it can read the host file system and use the network. A warning
    is logged.

In both modes: a scrubbed environment, ``python -I -S`` (no user site, no env vars, no
site-packages: standard library only), the limits of :class:`SandboxLimits` set with
``prlimit`` (address space, file size, processes, open files; the harness's own CPU
budget), a wall-clock backstop after which the whole process group is killed, and a
cap on captured output. Programs run under :mod:`rl.rewards.sandbox_harness`, which
forks one child per case with that case's CPU limit and wall clock (so the
interpreter's start-up never counts against a program) and runs the checker after the
candidate is gone.
When we are root the program also runs under its own unprivileged uid (one per pool
slot, via ``setpriv``): it can write nothing the host owns, cannot signal host
processes, and the process limit really applies (root is exempt from RLIMIT_NPROC);
every process of that uid is killed after each run.

Limits are applied by exec'd wrappers (``setpriv``, ``prlimit``) rather than a Python
``preexec_fn`` so that the launch can use vfork: forking a trainer process that maps
gigabytes would cost far more than the program itself.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rl.rewards.sandbox_harness import WALL_EXTENSIONS

logger = logging.getLogger(__name__)

_HARNESS_SOURCE = (Path(__file__).parent / "sandbox_harness.py").read_text()
BUBBLEWRAP = "bubblewrap"
RLIMITS_ONLY = "rlimits-only"
_MB = 1024 * 1024


@dataclass
class SandboxLimits:
    """Per-run resource limits."""

    cpu_s: int = 2  # RLIMIT_CPU of each case, counted from the fork (SIGXCPU at the limit, SIGKILL one second later)
    wall_s: float = 5.0  # wall clock while the program is not runnable (renewed while a busy machine starves it)
    memory_mb: int = 512  # RLIMIT_AS (address space)
    output_bytes: int = 1 * _MB  # stdout + stderr captured; beyond that the run is killed
    file_size_mb: int = 16  # RLIMIT_FSIZE, and the size of the /sandbox tmpfs
    max_processes: int = 16  # RLIMIT_NPROC (enforced when running under a dropped uid)
    open_files: int = 64  # RLIMIT_NOFILE

    def validate(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_mb", "output_bytes", "file_size_mb", "max_processes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Case:
    """One test case of a program: ``stdin`` to feed; ``test`` code for a call case (see the harness);
    ``expected`` output for the checker of a stdin/stdout case."""

    stdin: str = ""
    test: Optional[str] = None
    expected: Optional[str] = None


@dataclass
class RunResult:
    """Outcome of one sandboxed case.

    ``status``: ``ok`` (a stdin/stdout run that exited 0; a call case whose test ran to
    completion), ``test_failed`` (a call case's assertion was false), ``runtime_error``
    (non-zero exit, an exception, or killed by a signal: CPU and memory limits included),
    ``timeout`` (wall clock while not runnable), ``output_limit``, ``hack_suspect`` (a
    call case that ended without the driver's completion record: exit tricks, hooks,
    non-plain comparisons, blocked introspection) or ``sandbox_error`` (the sandbox
    itself failed; never a pass). ``checker``: the checker's verdict on this case's
    output (``accept`` / ``reject`` / ``error: ...``), when one ran.
    """

    status: str
    returncode: Optional[int]
    stdout: str
    stderr: str
    wall_s: float
    detail: str = ""
    cpu_s: float = 0.0
    checker: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        """One line for reward reasons: status, detail and the last stderr line."""
        parts = [self.status] + ([self.detail] if self.detail else [])
        lines = self.stderr.strip().splitlines()
        if lines:
            parts.append(lines[-1][:200])
        return ": ".join(parts)


_SIGNAL_NAMES = {signal.SIGXCPU: "CPU time limit", signal.SIGKILL: "killed (SIGKILL)", signal.SIGSEGV: "segmentation fault",
                 signal.SIGXFSZ: "file size limit", signal.SIGABRT: "aborted"}


def _python_paths(python: str) -> tuple[str, str]:
    """(real interpreter path, install prefix to bind) for ``python``."""
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))  # <prefix>/bin/python3.x
    if not os.path.isdir(os.path.join(prefix, "lib")):
        raise ValueError(f"Sandbox: cannot find the install prefix of {python!r} (looked at {prefix}/lib); "
                         "pass python= an interpreter laid out as <prefix>/bin/python3.x")
    return real, prefix


def _world_executable(path: str) -> bool:
    """True if a user with no special rights can execute ``path`` (every parent dir searchable)."""
    p = os.path.realpath(path)
    if not os.stat(p).st_mode & 0o001:
        return False
    while p != "/":
        p = os.path.dirname(p)
        if not os.stat(p).st_mode & 0o001:
            return False
    return True


class Sandbox:
    """Isolated runner of Python programs; at most ``workers`` run at once.

    ``isolation``: ``"auto"`` (bubblewrap if it works, else rlimits-only with a warning),
    ``"bubblewrap"`` (error if it does not work) or ``"rlimits-only"``.
    Thread-safe: callers in many threads share the ``workers`` slots.
    """

    _probe_cache: dict = {}
    _probe_lock = threading.Lock()

    def __init__(self, limits: Optional[SandboxLimits] = None, workers: int = 2, isolation: str = "auto",
                 python: Optional[str] = None) -> None:
        self.limits = limits or SandboxLimits()
        self.limits.validate()
        if workers < 1:
            raise ValueError(f"Sandbox: workers must be >= 1, got {workers}")
        if isolation not in ("auto", BUBBLEWRAP, RLIMITS_ONLY):
            raise ValueError(f"Sandbox: isolation must be 'auto', '{BUBBLEWRAP}' or '{RLIMITS_ONLY}', got {isolation!r}")
        self.python, self._prefix = _python_paths(python or getattr(sys, "_base_executable", sys.executable))
        self._prlimit = shutil.which("prlimit")
        self._setpriv = shutil.which("setpriv")
        if self._prlimit is None:
            raise RuntimeError("Sandbox: the 'prlimit' tool (util-linux) is required to apply resource limits; "
                               "install util-linux")
        self.isolation = self._choose_isolation(isolation)
        # In rlimits-only mode the dropped uid sees the host file system, so it needs to reach python.
        self.drops_uid = (os.geteuid() == 0 and self._setpriv is not None
                          and (self.isolation == BUBBLEWRAP or _world_executable(self.python)))
        if os.geteuid() == 0 and not self.drops_uid:
            logger.warning("sandbox: programs run as root (no setpriv, or %s is not reachable by other users): "
                           "the process-count limit does not apply to root", self.python)
        # Distinct uids per slot and (probably) per process, so runs never share a process count.
        base_uid = 200_000 + (os.getpid() % 4096) * 64
        self.uids = [base_uid + i for i in range(workers)]  # the uids programs run under (when root)
        self._slots: "queue.Queue[int]" = queue.Queue()
        for uid in self.uids:
            self._slots.put(uid)
        self.workers = workers

    # ------------------------------------------------------------------ set-up

    def _choose_isolation(self, requested: str) -> str:
        if requested == RLIMITS_ONLY:
            logger.warning("sandbox isolation: rlimits-only (requested): no file-system or network isolation")
            return RLIMITS_ONLY
        bwrap = shutil.which("bwrap")
        key = (bwrap, self.python)
        with Sandbox._probe_lock:
            if key not in Sandbox._probe_cache:
                Sandbox._probe_cache[key] = self._probe_bwrap(bwrap) if bwrap else "bwrap not found on PATH"
            problem = Sandbox._probe_cache[key]
        if problem is None:
            logger.info("sandbox isolation: bubblewrap (no network, private pid namespace, read-only system binds)")
            return BUBBLEWRAP
        if requested == BUBBLEWRAP:
            raise RuntimeError(f"Sandbox: isolation='bubblewrap' requested but it does not work here: {problem}; "
                               "install bubblewrap (apt-get install bubblewrap) or use isolation='auto'")
        logger.warning("sandbox isolation: rlimits-only (%s): programs can read the host file system and use "
                       "the network; install bubblewrap for full isolation", problem)
        return RLIMITS_ONLY

    def _probe_bwrap(self, bwrap: str) -> Optional[str]:
        """None if a trivial program runs under bwrap with our flags, else the problem."""
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as work:
            path = os.path.join(work, "main.py")
            with open(path, "w") as f:
                f.write("print('ok')\n")
            argv = self._command(BUBBLEWRAP, work, ["main.py"], uid=None, bwrap=bwrap)
            try:
                proc = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"{type(e).__name__}: {e}"
        if proc.returncode != 0 or proc.stdout.strip() != b"ok":
            return f"bwrap exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:200]}"
        return None

    def _command(self, isolation: str, work: str, files: Sequence[str], uid: Optional[int],
                 bwrap: Optional[str] = None, script: str = "main.py", cpu_s: Optional[int] = None) -> list[str]:
        """argv: [bwrap ...] [setpriv ...] prlimit ... python -I -S <script> (``cpu_s`` default: the limits')."""
        lim = self.limits
        cpu_s = cpu_s or lim.cpu_s
        inner = [self._prlimit, f"--cpu={cpu_s}:{cpu_s + 1}", f"--as={lim.memory_mb * _MB}",
                 f"--fsize={lim.file_size_mb * _MB}", f"--nofile={lim.open_files}", "--core=0"]
        if uid is not None:
            inner.append(f"--nproc={lim.max_processes}")
        inner += ["--", self.python, "-I", "-S", script]
        if uid is not None:
            inner = [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"] + inner
        if isolation != BUBBLEWRAP:
            return inner
        argv = [bwrap or shutil.which("bwrap"), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib32", "lib64", "sbin"):
            host = "/" + name
            if os.path.islink(host):
                argv += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                argv += ["--ro-bind", host, host]
        parent = os.path.dirname(self._prefix)  # bwrap creates the parents 0700 unless told otherwise
        parents = []
        while parent not in ("/", "/usr") and not parent.startswith("/usr/"):
            parents.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(parents):
            argv += ["--perms", "0755", "--dir", p]
        if not self._prefix.startswith("/usr/"):
            argv += ["--ro-bind", self._prefix, self._prefix]
        argv += ["--perms", "01777", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
                 "--perms", "0777", "--size", str(lim.file_size_mb * _MB), "--tmpfs", "/sandbox"]
        for name in files:
            argv += ["--ro-bind", os.path.join(work, name), f"/sandbox/{name}"]
        argv += ["--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
                 "--setenv", "HOME", "/sandbox", "--setenv", "LANG", "C.UTF-8", "--"]
        return argv + inner

    # ------------------------------------------------------------------ running

    def run(self, source: str, stdin: str = "") -> RunResult:
        """Run ``source`` as ``main.py`` on ``stdin`` (one stdin/stdout case of :meth:`run_cases`)."""
        return self.run_cases(source, [Case(stdin)])[0]

    def run_cases(self, source: str, cases: Sequence[Case], checker: Optional[str] = None) -> list[RunResult]:
        """Run one program on many cases inside a single sandbox, then ``checker`` on their outputs.

        A forked child per case (see :mod:`rl.rewards.sandbox_harness`) gets the per-run
        limits; the checker sees each stdin/stdout case's output only after every
        candidate process has ended. If the harness itself fails, every case without a
        result is a ``sandbox_error``.
        """
        if not cases:
            return []
        lim = self.limits
        phase1 = {"source": source, "cases": [{"stdin": c.stdin, "test": c.test} for c in cases],
                  "cpu_s": lim.cpu_s, "wall_s": lim.wall_s, "output_bytes": lim.output_bytes}
        phase2 = {"checker": checker, "expected": [c.expected for c in cases]} if checker is not None else {}
        part1, part2 = json.dumps(phase1).encode(), json.dumps(phase2).encode()
        stdin = f"{len(part1)} {len(part2)}\n".encode() + part1 + part2
        runs = len(cases) * (2 if checker is not None else 1)
        # A backstop only: each case has its own CPU and (extensible) wall limits inside. JSON escaping can grow
        # output up to 6x; the harness caps each case at output_bytes.
        run = self._in_sandbox({"harness.py": _HARNESS_SOURCE}, "harness.py", stdin,
                               lim.wall_s * WALL_EXTENSIONS * runs + 60.0, 6 * lim.output_bytes * len(cases) + 65536,
                               harness_cpu_s=30 + runs)
        results: list = [None] * len(cases)
        for line in run.stdout.splitlines():
            try:
                record = json.loads(line)
                if "case" in record:
                    results[record["case"]] = RunResult(record["status"], record["returncode"], record["stdout"],
                                                        record["stderr"], record["wall_s"], record["detail"],
                                                        record["cpu_s"])
                else:
                    results[record["check"]].checker = record["verdict"]
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                break
        failure = f"harness {run.describe()}" if not run.ok else "harness ended early"
        for i, r in enumerate(results):
            if r is None or (checker is not None and r.ok and cases[i].test is None and cases[i].expected is not None
                             and r.checker is None):
                results[i] = RunResult("sandbox_error", None, "", run.stderr[-2000:], run.wall_s, failure)
        return results

    def _in_sandbox(self, files: dict, script: str, stdin: bytes, wall_s: float, output_bytes: int,
                    harness_cpu_s: int) -> RunResult:
        uid = self._slots.get()
        work = tempfile.mkdtemp(prefix="sandbox-")
        try:
            os.chmod(work, 0o755)  # the dropped uid must be able to read the program (rlimits-only mode)
            for name, text in files.items():
                with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(os.path.join(work, name), 0o644)
            stdin_path = os.path.join(work, ".stdin")  # not bound into the sandbox: only the harness reads it
            with open(stdin_path, "wb") as f:
                f.write(stdin)
            os.chmod(stdin_path, 0o600)
            run_uid = uid if self.drops_uid else None
            argv = self._command(self.isolation, work, list(files), run_uid, script=script, cpu_s=harness_cpu_s)
            return self._execute(argv, work, stdin_path, run_uid, wall_s, output_bytes)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self._slots.put(uid)

    def run_many(self, jobs: Sequence[tuple]) -> list[RunResult]:
        """Run ``(source, stdin)`` jobs on the pool, one sandbox each; results in input order."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    def _execute(self, argv: list[str], work: str, stdin_path: str, uid: Optional[int], wall_s: float,
                 output_bytes: int) -> RunResult:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work}
        start = time.monotonic()
        try:
            with open(stdin_path, "rb") as stdin:
                proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=work, env=env, start_new_session=True, close_fds=True)
        except OSError as e:
            return RunResult("sandbox_error", None, "", "", 0.0, f"could not start: {e}")
        status, detail = "ok", ""
        out, err = bytearray(), bytearray()
        try:
            verdict = self._collect(proc, out, err, start + wall_s, output_bytes)
            if verdict is not None:
                status, detail = verdict
        finally:
            self._kill_group(proc)
            if uid is not None:  # escaped sessions, and the pid namespace's own teardown is asynchronous
                self._kill_uid(uid)
            proc.wait()
        wall = time.monotonic() - start
        rc = proc.returncode
        if status == "ok" and rc != 0:
            status = "runtime_error"
            sig = -rc if rc < 0 else (rc - 128 if self.isolation == BUBBLEWRAP and rc > 128 else None)
            detail = _SIGNAL_NAMES.get(sig, f"signal {sig}") if sig else f"exit code {rc}"
        return RunResult(status, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), wall, detail)

    @staticmethod
    def _collect(proc: subprocess.Popen, out: bytearray, err: bytearray, deadline: float,
                 cap: int) -> Optional[tuple[str, str]]:
        """Read both pipes until EOF; (status, detail) if the deadline or output cap hit first."""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        try:
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout", "wall clock limit exceeded"
                if proc.poll() is not None and not sel.select(0):
                    # The program ended; in rlimits-only mode a background child may still hold the
                    # pipes: stop reading instead of waiting for it.
                    break
                for key, _ in sel.select(min(remaining, 0.05)):
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    key.data.extend(chunk)
                    if len(out) + len(err) > cap:
                        del key.data[max(0, cap - (len(out) + len(err) - len(key.data))):]
                        return "output_limit", f"more than {cap} bytes of output"
            return None
        finally:
            sel.close()
            proc.stdout.close()
            proc.stderr.close()

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_uid(self, uid: int) -> None:
        """SIGKILL every process of ``uid`` (escaped sessions included): ``kill -1`` run as that uid."""
        subprocess.run([self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/bin/kill", "-9", "-1"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
