"""Runs inside the sandbox: one program on many test cases, one forked child per case, then the checker.

Started as ``python -I -S harness.py``; reads from stdin (a host file the program cannot
see) a header line ``<bytes of part 1> <bytes of part 2>`` and two JSON objects, the
second only after every candidate process has ended (unbuffered reads, so no child
inherits unread input):

1. ``{"source", "cases": [{"stdin", "test"}], "cpu_s", "wall_s", "output_bytes"}``: the
   candidate's cases. A case with ``test`` (Python statements, e.g. ``assert f(1) == 2``)
   is a *call* case, the others are stdin/stdout cases.
2. ``{"checker", "expected": [str or null per case]}``: the checker (source defining
   ``check(output, expected[, input]) -> bool``, see :mod:`data.checkers`) and the expected
   outputs. They enter this process only after the candidate is gone, so the program
   can never read them from its memory.

Writes one JSON line per case to stdout: ``{"case", "status", "returncode", "stdout",
"stderr", "detail", "wall_s", "cpu_s"}``, then ``{"check", "verdict"}`` per checked case
(``accept`` / ``reject`` / ``error: ...``).

Call cases: a trusted driver in the child imports the candidate as module ``solution``
and runs the test itself. Only when the test statements ran to completion does it
write ``<nonce> ok`` to a private pipe; the nonce is drawn here for each case and
appears in no file, argument or environment variable. So exiting early (``sys.exit``,
``os._exit``, exit hooks, a killed process), swallowing ``AssertionError`` or redefining
builtins (the test runs on a copy of the builtins taken before the candidate ran) yield
no record and fail. Comparisons in ``assert`` statements only accept plain data (exact
``int``, ``str``, ``list``, ... recursively), so an object whose ``__eq__`` always
answers True fails. An audit hook (which cannot be removed) refuses what would reach the
nonce in memory: frames (``sys._getframe``, ``tb_frame``, trace functions, signal
handlers), ``gc`` object walks, ``ctypes`` and ``/proc``; and process creation.

Each child: its own process group, fresh RLIMIT_CPU (interpreter start-up is the
harness's, never the program's), stdin/stdout/stderr on private pipes, every other
descriptor closed. The harness is non-dumpable (children cannot ptrace it or read its
memory) and kills the child's process group when the case ends. The wall clock of a
case only runs out while the program could not be running anyway: at the deadline a
program below its CPU limit that is runnable or has run since the last deadline (a busy
machine starving it) gets more time, up to ``WALL_EXTENSIONS`` times ``wall_s``. Only the standard library is used.
"""
import ast
import builtins
import json
import os
import resource
import selectors
import signal
import sys
import time

WALL_EXTENSIONS = 10
RECORD_CAP = 4096
_BLOCKED_EVENTS = frozenset({
    "sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
})
_BLOCKED_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
_BLOCKED_MODULES = ("signal", "_signal", "ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "faulthandler")
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_CONTAINERS = (list, tuple, set, frozenset)


class Blocked(ValueError):
    """Raised by the audit hook; a ValueError because the stdlib tolerates that from sys._getframe."""


class NotPlainData(Exception):
    """An assert compared something other than plain data."""


def _guard(tripped, blocked_events=_BLOCKED_EVENTS, blocked_attributes=_BLOCKED_ATTRIBUTES,
           blocked_modules=_BLOCKED_MODULES, blocked=Blocked, isinstance=isinstance, str=str):
    """The audit hook; everything it uses is bound now, so rebinding globals or builtins later changes nothing."""
    def hook(event, args):
        if event in blocked_events or event.startswith("ctypes.") \
                or (event == "object.__getattr__" and args[1] in blocked_attributes) \
                or (event == "open" and isinstance(args[0], str) and args[0].startswith("/proc")) \
                or (event == "import" and args[0] in blocked_modules):
            if event != "sys._getframe":  # the stdlib asks for frames itself (namedtuple, enum): not a sign
                tripped.append(event)
            raise blocked(f"blocked in the sandbox: {event}")
    return hook


def _plain_checker(plain_types=_PLAIN, containers=_CONTAINERS, not_plain=NotPlainData, type=type, dict=dict):
    """``plain(value)``: ``value`` if it is plain data (exact builtin scalars and containers of them), else
    NotPlainData. Bound at creation like :func:`_guard`."""
    def plain(value):
        stack, seen = [value], 0
        while stack:
            v = stack.pop()
            t = type(v)
            seen += 1
            if t in plain_types:
                continue
            if t in containers:
                stack.extend(v)
            elif t is dict:
                stack.extend(v.keys())
                stack.extend(v.values())
            else:
                raise not_plain(f"the test compared a {t.__name__!r} object; only plain data (int, str, list, ...) counts")
            if seen > 10_000_000:
                raise not_plain("the test compared more than 10^7 values")
        return value
    return plain


class _PlainOperands(ast.NodeTransformer):
    """Wraps the operands of comparisons, boolean operators, ``not`` and each assert's test in ``__plain__(...)``."""

    @staticmethod
    def _wrap(node):
        return ast.Call(func=ast.Name(id="__plain__", ctx=ast.Load()), args=[node], keywords=[])

    def visit_Compare(self, node):
        self.generic_visit(node)
        node.left = self._wrap(node.left)
        node.comparators = [self._wrap(c) for c in node.comparators]
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        node.values = [self._wrap(v) for v in node.values]
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            node.operand = self._wrap(node.operand)
        return node

    def visit_Assert(self, node):
        self.generic_visit(node)
        node.test = self._wrap(node.test)
        return node


def _compile_test(test):
    tree = _PlainOperands().visit(ast.parse(test, "test.py", "exec"))
    return compile(ast.fix_missing_locations(tree), "test.py", "exec")


def _describe(error):
    """One line for stderr without touching the traceback's frames."""
    try:
        return f"{type(error).__name__}: {error}"[:2000]
    except BaseException:
        return type(error).__name__


def _candidate_child(source, test, nonce, cpu_s):
    """Run the candidate: as ``__main__`` on stdin (no test), or imported and tested (a call case).

    Everything used after the candidate's code has run is bound to locals first: the
    candidate can rebind builtins and this module's globals, not our locals."""
    write, exit_now, run, copy = os.write, os._exit, exec, dict
    assertion_error, system_exit, base_exception, not_plain = AssertionError, SystemExit, BaseException, NotPlainData
    flush_and_exit, describe = _flush_and_exit, _describe
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    builtins_copy = copy(builtins.__dict__)
    plain = _plain_checker()
    if test is not None:
        try:
            test_code = _compile_test(test)
        except SyntaxError as e:
            write(3, f"fail test_error the test does not compile: {e.msg} (line {e.lineno})\n".encode())
            exit_now(0)
    ok_record = f"{nonce} ok\n".encode()
    del nonce
    for name in _BLOCKED_MODULES:
        sys.modules.pop(name, None)
    tripped = []
    sys.addaudithook(_guard(tripped))
    module = {"__name__": "__main__" if test is None else "solution", "__builtins__": builtins}
    try:
        run(compile(source, "main.py", "exec"), module)
    except system_exit as e:
        if test is None:
            code = e.code if type(e.code) is int else (0 if e.code is None else 1)
            if e.code is not None and type(e.code) is not int:
                sys.stderr.write(f"{e.code}\n")
            flush_and_exit(code, exit_now)
        kind = "hack_suspect" if e.code in (0, None) else "crash"
        write(3, f"fail {kind} the program exited while being imported\n".encode())
        exit_now(1)
    except base_exception as e:
        sys.stderr.write(describe(e) + "\n")
        if test is not None:
            write(3, f"fail {'hack_suspect' if tripped else 'crash'} import raised {type(e).__name__}\n".encode())
        flush_and_exit(1, exit_now)
    if test is None:
        flush_and_exit(0, exit_now)
    namespace = copy(module)
    namespace["__builtins__"] = builtins_copy
    namespace["__plain__"] = plain
    try:
        run(test_code, namespace)
    except assertion_error as e:
        write(3, f"fail wrong_answer assertion failed{': ' + str(e)[:200] if e.args else ''}\n".encode())
    except not_plain as e:
        write(3, f"fail hack_suspect {e}\n".encode())
    except system_exit:
        write(3, b"fail hack_suspect the program called exit during the test\n")
    except base_exception as e:
        sys.stderr.write(describe(e) + "\n")
        write(3, f"fail {'hack_suspect' if tripped else 'crash'} test raised {type(e).__name__}\n".encode())
    else:
        write(3, ok_record)
    flush_and_exit(0, exit_now)


def _checker_child(checker, output, expected, stdin, cpu_s):
    """Trusted: ``check(output, expected[, input])`` of the checker source; only ``True`` accepts."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    try:
        namespace = {"__name__": "checker"}
        exec(compile(checker, "checker.py", "exec"), namespace)
        check = namespace["check"]
        args = (output, expected, stdin) if check.__code__.co_argcount >= 3 else (output, expected)
        verdict = check(*args)
        record = b"accept\n" if verdict is True else b"reject\n"
    except BaseException as e:
        record = f"error {_describe(e)[:300]}\n".encode()
    os.write(3, record)
    os._exit(0)


def _flush_and_exit(code, exit_now):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 1
    exit_now(code)


def _cpu_seconds(pid):
    """(state, utime + stime in seconds) of a live child from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_child(target, args, stdin_text, cpu_s, wall_s, cap):
    """Fork ``target(*args)`` on private pipes (fd 3 = record pipe); returns the run's facts."""
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    rec_r, rec_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for fd, target_fd in ((stdin_r, 0), (out_w, 1), (err_w, 2), (rec_w, 3)):
                os.dup2(fd, target_fd)
            os.closerange(4, 1 << 16)
            target(*args)
        finally:
            os._exit(1)
    for fd in (stdin_r, out_w, err_w, rec_w):
        os.close(fd)
    data = stdin_text.encode()
    status, detail = "ok", ""
    bufs = {out_r: bytearray(), err_r: bytearray(), rec_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in (out_r, err_r, rec_r):
        sel.register(fd, selectors.EVENT_READ)
    if data:
        os.set_blocking(stdin_w, False)
        sel.register(stdin_w, selectors.EVENT_WRITE)
    else:
        os.close(stdin_w)
    start = time.monotonic()
    deadline, extensions, cpu_seen = start + wall_s, 0, 0.0
    while len(sel.get_map()) > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            facts = _cpu_seconds(pid)
            # Runnable now, or it ran since the last look (a starved program is caught between time slices
            # in page faults and pipe writes too): a busy machine is slowing it, so its CPU limit decides.
            working = facts is not None and (facts[0] == "R" or facts[1] > cpu_seen)
            if working and facts[1] < cpu_s and extensions < WALL_EXTENSIONS:
                extensions += 1
                deadline, cpu_seen = deadline + wall_s, facts[1]
                continue
            status, detail = "timeout", "wall clock limit exceeded"
            break
        for key, _ in sel.select(remaining):
            fd = key.fd
            if fd == stdin_w:
                try:
                    data = data[os.write(fd, data[:65536]):]
                except BrokenPipeError:
                    data = b""
                if not data:
                    sel.unregister(fd)
                    os.close(fd)
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                continue
            bufs[fd] += chunk
            if len(bufs[rec_r]) > RECORD_CAP:
                del bufs[rec_r][RECORD_CAP:]
            if len(bufs[out_r]) + len(bufs[err_r]) > cap:
                status, detail = "output_limit", f"more than {cap} bytes of output"
                break
        if status != "ok":
            break
    if stdin_w in sel.get_map():
        os.close(stdin_w)
    sel.close()
    try:
        os.killpg(pid, signal.SIGKILL)  # background children of the case die with it
    except (ProcessLookupError, PermissionError):
        pass
    _, wstatus, usage = os.wait4(pid, 0)
    for fd in (out_r, err_r, rec_r):
        os.close(fd)
    half = cap // 2
    return {"status": status, "detail": detail, "returncode": os.waitstatus_to_exitcode(wstatus),
            "stdout": bufs[out_r][:cap].decode("utf-8", "replace"), "stderr": bufs[err_r][-half:].decode("utf-8", "replace"),
            "record": bufs[rec_r].decode("utf-8", "replace"), "wall_s": time.monotonic() - start,
            "cpu_s": usage.ru_utime + usage.ru_stime}


_SIGNALS = {signal.SIGXCPU: "CPU time limit", signal.SIGKILL: "killed (SIGKILL)", signal.SIGSEGV: "segmentation fault"}


def _exit_detail(rc):
    return _SIGNALS.get(-rc, f"signal {-rc}") if rc < 0 else f"exit code {rc}"


def _run_case(spec, case):
    nonce = os.urandom(16).hex()
    test = case.get("test")
    run = _run_child(_candidate_child, (spec["source"], test, nonce, spec["cpu_s"]), case.get("stdin", ""),
                     spec["cpu_s"], spec["wall_s"], spec["output_bytes"])
    record, rc = run.pop("record"), run["returncode"]
    if run["status"] != "ok":
        return run
    if test is None:
        if rc != 0:
            run["status"], run["detail"] = "runtime_error", _exit_detail(rc)
        return run
    first = record.split("\n", 1)[0]
    if first == f"{nonce} ok":
        return run
    if first.startswith("fail "):
        kind, _, why = first[5:].partition(" ")
        status = {"wrong_answer": "test_failed", "crash": "runtime_error", "hack_suspect": "hack_suspect",
                  "test_error": "sandbox_error"}.get(kind, "runtime_error")
        run["status"], run["detail"] = status, why
    elif rc == 0:
        run["status"], run["detail"] = "hack_suspect", "the process exited with status 0 before the test completed"
    else:
        run["status"], run["detail"] = "runtime_error", _exit_detail(rc)
    return run


def _check(spec, checker, output, expected, stdin):
    run = _run_child(_checker_child, (checker, output, expected, stdin, spec["cpu_s"]), "", spec["cpu_s"], spec["wall_s"],
                     spec["output_bytes"])
    record = run["record"].split("\n", 1)[0]
    if run["status"] == "ok" and record in ("accept", "reject"):
        return record
    if run["status"] == "ok" and record.startswith("error "):
        return "error: " + record[6:]
    return f"error: checker {run['status']} {run['detail'] or _exit_detail(run['returncode'])}".strip()


def _emit(obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:  # fd 1 is closed in every child: only we write results
        data = data[os.write(1, data):]


def _read_exactly(n):
    """``n`` bytes from fd 0, unbuffered: nothing beyond them may sit in a buffer a child inherits."""
    chunks = []
    while n > 0:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            raise EOFError("harness input ended early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_header():
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise EOFError("harness input has no header")
        header += byte
    return [int(x) for x in header.split()]


def main():
    _set_non_dumpable()
    n_cases, n_checks = _read_header()
    spec = json.loads(_read_exactly(n_cases))
    outputs = []
    for i, case in enumerate(spec["cases"]):
        run = _run_case(spec, case)
        outputs.append(run["stdout"] if run["status"] == "ok" and case.get("test") is None else None)
        _emit({"case": i, **run})
    checks = json.loads(_read_exactly(n_checks))  # only now: the expected outputs never meet a candidate process
    if checks.get("checker") is not None:
        for i, (output, expected) in enumerate(zip(outputs, checks["expected"])):
            if output is not None and expected is not None:
                verdict = _check(spec, checks["checker"], output, expected, spec["cases"][i].get("stdin", ""))
                _emit({"check": i, "verdict": verdict})


def _set_non_dumpable():
    """prctl(PR_SET_DUMPABLE, 0): same-uid children may not ptrace us or read /proc/<harness>/mem."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


if __name__ == "__main__":
    main()
