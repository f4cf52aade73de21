"""Runs inside the sandbox: executes one program on many test cases, one forked child per case.

Started as ``python -I -S harness.py`` next to ``cases.json`` ({"source", "cases": [{"stdin",
"suffix"}], "cpu_s", "wall_s", "output_bytes"}); writes one JSON line per case to stdout:
{"status", "returncode", "stdout", "stderr", "detail"}. Forking an interpreter that is
already up costs about a millisecond, where a fresh sandbox costs tens: this is what
makes hundreds of cases per second possible.

Each child: its own process group, fresh RLIMIT_CPU, stdin/stdout/stderr on private
pipes, every other descriptor closed (it cannot write the result stream), and the
harness is non-dumpable (children cannot ptrace it or read its memory). The harness
kills the child's process group when the case ends. Only the standard library is used:
this file runs under ``-I -S``.
"""
import json
import os
import resource
import selectors
import signal
import sys
import time
import traceback


def _child(source, suffix, stdin_r, out_w, err_w, cpu_s):
    os.setpgid(0, 0)
    os.dup2(stdin_r, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.closerange(3, 1 << 16)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    code = 0
    try:
        program = compile(source + suffix, "main.py", "exec")
        exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            sys.stderr.write(f"{e.code}\n")
    except BaseException:  # the candidate's error: report it like the interpreter would
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 1
    os._exit(code)


def _run_case(source, case, cpu_s, wall_s, cap):
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        for fd in (stdin_w, out_r, err_r):
            os.close(fd)
        _child(source, case.get("suffix", ""), stdin_r, out_w, err_w, cpu_s)
    for fd in (stdin_r, out_w, err_w):
        os.close(fd)
    data = case.get("stdin", "").encode()
    status, detail = "ok", ""
    bufs = {out_r: bytearray(), err_r: bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ)
    sel.register(err_r, selectors.EVENT_READ)
    if data:
        os.set_blocking(stdin_w, False)
        sel.register(stdin_w, selectors.EVENT_WRITE)
    else:
        os.close(stdin_w)
    start = time.monotonic()
    deadline = start + wall_s
    while len(sel.get_map()) > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
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
    _, wstatus = os.waitpid(pid, 0)
    for fd in (out_r, err_r):
        os.close(fd)
    rc = os.waitstatus_to_exitcode(wstatus)
    if status == "ok" and rc != 0:
        status = "runtime_error"
        names = {signal.SIGXCPU: "CPU time limit", signal.SIGKILL: "killed (SIGKILL)", signal.SIGSEGV: "segmentation fault"}
        detail = names.get(-rc, f"signal {-rc}") if rc < 0 else f"exit code {rc}"
    half = cap // 2
    return {"status": status, "returncode": rc, "stdout": bufs[out_r][:cap].decode("utf-8", "replace"),
            "stderr": bufs[err_r][-half:].decode("utf-8", "replace"), "detail": detail,
            "wall_s": time.monotonic() - start}


def main():
    with open("cases.json") as f:
        spec = json.load(f)
    _set_non_dumpable()
    for case in spec["cases"]:
        result = _run_case(spec["source"], case, spec["cpu_s"], spec["wall_s"], spec["output_bytes"])
        data = (json.dumps(result) + "\n").encode()
        while data:  # fd 1 is closed in every child: only we write results
            data = data[os.write(1, data):]


def _set_non_dumpable():
    """prctl(PR_SET_DUMPABLE, 0): same-uid children may not ptrace us or read /proc/<harness>/mem."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


if __name__ == "__main__":
    main()
