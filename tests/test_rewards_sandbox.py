"""Code sandbox: attacks end with reward 0, a reason and the host unharmed; correctness cases pass/fail right."""
import os
import socket
import threading
import time

import pytest

from rl.rewards.base import ScoringSample
from rl.rewards.code_reward import CodeReward, CodeRewardConfig, extract_code, outputs_match
from rl.rewards.sandbox import BUBBLEWRAP, RLIMITS_ONLY, Sandbox, SandboxLimits

LIMITS = SandboxLimits(cpu_s=1, wall_s=3.0, memory_mb=256, output_bytes=64 * 1024, file_size_mb=4, max_processes=8)


@pytest.fixture(scope="module")
def reward():
    return CodeReward(CodeRewardConfig(mode="fraction", limits=LIMITS, workers=2))


@pytest.fixture
def isolated(reward):
    if reward.sandbox.isolation != BUBBLEWRAP:
        pytest.skip("bubblewrap does not work on this machine (sandbox fell back to rlimits-only)")
    return reward


@pytest.fixture
def contained(reward):
    """Programs cannot signal or outlive-hide from us: bubblewrap, or limits under a dropped uid."""
    if reward.sandbox.isolation != BUBBLEWRAP and not reward.sandbox.drops_uid:
        pytest.skip("neither bubblewrap nor a dropped uid: programs run as our own user")
    return reward


def score(reward, program, tests, checker=None):
    return reward.score(ScoringSample(response=f"```python\n{program}\n```", tests=tests, checker=checker, domain="code"))


def assert_zero(result):
    assert result.reward == 0.0 and not result.correct, result
    assert result.reason and "0/1" in result.reason, result


def host_processes_with(token: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def processes_of_uids(uids) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
                with open(f"/proc/{pid}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, StopIteration):
                continue
            if uid in uids and not zombie:
                found.append(int(pid))
    return found


def wait_gone(find, patience_s: float = 5.0) -> bool:
    """True once ``find()`` comes back empty; SIGKILLed processes take a moment to be reaped."""
    deadline = time.monotonic() + patience_s
    while find():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_isolation_is_reported(reward):
    assert reward.sandbox.isolation in (BUBBLEWRAP, RLIMITS_ONLY)


# ----------------------------------------------------------------------------- attacks


@pytest.mark.timeout(60)
def test_infinite_loop(reward):
    res = score(reward, "while True:\n    pass", [{"input": "", "output": "done"}])
    assert_zero(res)
    assert "CPU time limit" in res.reason or "timeout" in res.reason


@pytest.mark.timeout(60)
def test_sleeping_forever_hits_wall_clock(reward):
    res = score(reward, "import time\ntime.sleep(1000)\nprint('done')", [{"input": "", "output": "done"}])
    assert_zero(res)
    assert "timeout" in res.reason


@pytest.mark.timeout(60)
def test_fork_bomb(reward):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    res = score(reward, program, [{"input": "", "output": "done"}])
    assert_zero(res)
    assert wait_gone(lambda: processes_of_uids(reward.sandbox.uids)), "fork bomb processes survived"
    assert score(reward, "print('ok')", [{"input": "", "output": "ok"}]).correct  # the pool still works


@pytest.mark.timeout(60)
def test_huge_allocation(reward):
    res = score(reward, "x = bytearray(10 * 1024 ** 3)\nprint('allocated')", [{"input": "", "output": "allocated"}])
    assert_zero(res)
    assert "MemoryError" in res.reason


@pytest.mark.timeout(60)
def test_gigabyte_of_output(reward):
    program = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    res = score(reward, program, [{"input": "", "output": "x"}])
    assert_zero(res)
    assert "output_limit" in res.reason


@pytest.mark.timeout(60)
def test_write_outside_temp_dir(isolated, tmp_path):
    target = tmp_path / "pwned.txt"
    program = f"open({str(target)!r}, 'w').write('pwned')\nopen('/usr/pwned', 'w')\nprint('written')"
    res = score(isolated, program, [{"input": "", "output": "written"}])
    assert_zero(res)
    assert not target.exists() and not os.path.exists("/usr/pwned")


@pytest.mark.timeout(60)
def test_read_planted_file(isolated, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    res = score(isolated, f"print(open({str(secret)!r}).read())", [{"input": "", "output": "s3cr3t"}])
    assert_zero(res)
    assert "FileNotFoundError" in res.reason or "PermissionError" in res.reason


@pytest.mark.timeout(60)
def test_network_socket(isolated):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    res = score(isolated, program, [{"input": "", "output": "connected"}])
    assert_zero(res)
    server.close()
    time.sleep(0.1)
    assert accepted in ([], [None])


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


@pytest.mark.timeout(60)
def test_kill_parent(contained):
    reward = contained
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\nprint('killed')"
    res = score(reward, program, [{"input": "", "output": "killed"}])
    assert_zero(res)
    assert os.getppid() != 1  # we (the host side) are alive and still attached


@pytest.mark.timeout(60)
def test_background_process_is_gone_afterwards(contained):
    reward = contained
    token = f"orphan-{os.getpid()}-{time.monotonic_ns()}"
    # The orphan would print the expected answer after the main program returned, then linger.
    program = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(0.5); print(42, flush=True); "
        f"time.sleep(60)', {token!r}])\n"
    )
    res = score(reward, program, [{"input": "", "output": "42"}])
    assert_zero(res)
    assert wait_gone(lambda: host_processes_with(token)), "a background process outlived the sandbox run"


# ----------------------------------------------------------------------------- correctness


def test_right_program_passes(reward):
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
    res = score(reward, "a, b = map(int, input().split())\nprint(a + b)", tests)
    assert res.reward == 1.0 and res.correct and res.reason == "2/2 tests passed"


def test_wrong_program_fails_and_fraction_counts(reward):
    tests = [{"input": "2 2\n", "output": "4"}, {"input": "2 3\n", "output": "5"}]
    res = score(reward, "a, b = map(int, input().split())\nprint(a * b)", tests)
    assert res.reward == 0.5 and not res.correct
    assert "wrong answer" in res.reason


def test_all_or_nothing_mode(reward):
    strict = CodeReward(CodeRewardConfig(mode="all"), sandbox=reward.sandbox)
    tests = [{"input": "2 2\n", "output": "4"}, {"input": "2 3\n", "output": "5"}]
    res = score(strict, "a, b = map(int, input().split())\nprint(a * b)", tests)
    assert res.reward == 0.0 and "1/2" in res.reason


def test_function_call_assertions(reward):
    program = "def add(a, b):\n    return a + b"
    good = score(reward, program, [{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(-1, 1) == 0"}])
    bad = score(reward, program, [{"assert": "assert add(2, 2) == 5"}])
    assert good.correct and good.reward == 1.0
    assert not bad.correct and "assertion failed" in bad.reason and bad.category == "wrong_answer"


CHECKER_ANY_DIVISOR = """
def check(output, expected, input):
    n = int(input)
    got = output.split()
    if len(got) != 1:
        return False
    d = int(got[0])
    return 1 < d < n and n % d == 0
"""


def test_checker_accepts_alternative_valid_answer(reward):
    tests = [{"input": "12\n", "output": "2\n"}]  # any proper divisor is valid; the reference says 2
    alternative = score(reward, "n = int(input())\nprint(n // 2)", tests, checker=CHECKER_ANY_DIVISOR)
    wrong = score(reward, "n = int(input())\nprint(5)", tests, checker=CHECKER_ANY_DIVISOR)
    assert alternative.correct and alternative.reward == 1.0
    assert not wrong.correct and "rejected by checker (reject)" in wrong.reason
    garbage = score(reward, "print('twelve')", tests, checker=CHECKER_ANY_DIVISOR)  # the checker raises on it
    assert not garbage.correct and "rejected by checker (error: ValueError" in garbage.reason
    assert not score(reward, "print(6)", tests).correct  # without the checker: exact comparison


def test_float_tolerance(reward):
    tolerant = CodeReward(CodeRewardConfig(float_tol=1e-6), sandbox=reward.sandbox)
    tests = [{"input": "", "output": "0.3333333333"}]
    assert score(tolerant, "print(1 / 3)", tests).correct
    assert not score(tolerant, "print(0.3334)", tests).correct
    assert not score(reward, "print(1 / 3)", tests).correct  # exact tokens by default


def test_output_comparison_rules():
    assert outputs_match("1 2\n3  \n\n", "1 2 3")
    assert not outputs_match("1 2", "1 2 3")
    assert outputs_match("1.0000001", "1", float_tol=1e-6)
    assert not outputs_match("nan", "1", float_tol=1.0)


def test_extract_code_takes_last_block():
    text = "First:\n```python\nprint(1)\n```\nFixed:\n```py\nprint(2)\n```"
    assert extract_code(text).strip() == "print(2)"
    assert extract_code("print(3)") == "print(3)"


def test_bad_tests_are_clear_errors(reward):
    with pytest.raises(ValueError, match="'output'"):
        score(reward, "print(1)", [{"stdin": "1"}])
    with pytest.raises(ValueError, match="tests"):
        reward.score(ScoringSample(response="print(1)"))


@pytest.mark.timeout(60)
def test_rlimits_only_fallback_still_limits():
    sandbox = Sandbox(LIMITS, workers=1, isolation=RLIMITS_ONLY)
    assert sandbox.isolation == RLIMITS_ONLY
    assert sandbox.run("print(int(input()) * 2)", "21\n").stdout == "42\n"
    assert "MemoryError" in sandbox.run("x = bytearray(10 * 1024 ** 3)").describe()
    assert sandbox.run("while True:\n    pass").status in ("runtime_error", "timeout")
