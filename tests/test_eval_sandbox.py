"""The code sandbox stops runaway and hostile programs and reports them as failures with a reason, never as a crash;
nothing a program starts or writes outlives the run, and the evaluator never opens a path the program controls."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

import pytest

import llmlab
from llmlab.errors import LLMLabError
from llmlab.eval import sandbox
from llmlab.eval.sandbox import SandboxLimits, SandboxResult, check, classify, memory_bound_mb, run_program

FAST = SandboxLimits(timeout=3, memory_mb=512, max_processes=16)
UNROUTABLE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never a real host, even if the network were reachable


@pytest.fixture
def needs_sandbox():
    """Skip, saying why, where this machine cannot build the sandbox (run_program then refuses: see the tests below)."""
    try:
        check()
    except LLMLabError as e:
        pytest.skip(f"no sandbox on this machine: {e}")


def run_bounded(source: str, limits: SandboxLimits = FAST, within: float = 120) -> SandboxResult:
    """run_program in a thread, so a hang fails the test instead of freezing the suite."""
    box: list = []
    worker = threading.Thread(target=lambda: box.append(run_program(source, limits)), daemon=True)
    worker.start()
    worker.join(within)
    assert box, f"run_program did not return within {within} s"
    return box[0]


def host_processes_with(marker: str) -> list[int]:
    """PIDs of host processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


# -- what it already did ----------------------------------------------------------------------------------------
def test_a_passing_program_passes_and_its_output_comes_back(needs_sandbox):
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('all good')\n", FAST)
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert "all good" in result.output


def test_a_failing_assertion_is_a_failure(needs_sandbox):
    result = run_program("assert 1 + 1 == 3, 'wrong sum'\n", FAST)
    assert result.status == "failed" and not result.passed and result.returncode == 1
    assert "AssertionError: wrong sum" in result.output


def test_an_infinite_loop_is_stopped(needs_sandbox):
    result = run_bounded("while True:\n    pass\n")
    assert result.status == "timeout"


def test_a_sleeping_program_is_stopped_by_the_wall_timeout(needs_sandbox):
    result = run_bounded("import time\ntime.sleep(600)\n", SandboxLimits(timeout=1))
    assert result.status == "timeout"


def test_a_fork_bomb_hits_the_process_limit(needs_sandbox):
    result = run_bounded("import os\nwhile True:\n    os.fork()\n")
    assert result.status == "processes" and not result.passed  # the forks fail at the limit, before the timeout
    assert "Resource temporarily unavailable" in result.output


def test_a_huge_allocation_is_a_memory_failure(needs_sandbox):
    result = run_program("block = bytearray(64 * 2**30)\n", FAST)
    assert result.status == "memory" and "MemoryError" in result.output


def test_network_calls_fail(needs_sandbox):
    result = run_program(f"import socket\nsocket.create_connection(({UNROUTABLE!r}, 80), timeout=2)\n", FAST)
    assert result.status == "network" and "network access is disabled" in result.output


def test_network_is_cut_below_the_socket_module(needs_sandbox):
    program = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(({UNROUTABLE!r}, 80))\n"
    result = run_program(program, FAST)
    assert result.status == "network" and "Network is unreachable" in result.output


def test_network_is_cut_for_other_programs_too(needs_sandbox):
    program = ("import subprocess\n"
               f"done = subprocess.run(['bash', '-c', 'echo hi > /dev/tcp/{UNROUTABLE}/80'])\n"
               "raise SystemExit(done.returncode)\n")
    result = run_program(program, FAST)
    assert result.status == "network" and "Network is unreachable" in result.output


def test_writing_a_huge_file_is_stopped(needs_sandbox):
    result = run_program("open('big.bin', 'wb').write(b'x' * (64 * 2**20))\n", SandboxLimits(timeout=5, max_file_mb=4))
    assert result.status == "file_size"


def test_the_program_runs_in_its_own_writable_folder(needs_sandbox):
    result = run_program("import os\nprint(os.getcwd(), os.environ['HOME'])\nopen('scratch.txt', 'w').write('x')\n",
                         FAST)
    assert result.passed and f"{sandbox.WORKDIR} {sandbox.WORKDIR}" in result.output


def test_the_evaluator_cannot_be_signalled(needs_sandbox):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        program = ("import os, signal\n"
                   f"for pid in ({os.getpid()}, os.getppid()):\n"
                   "    try:\n        os.kill(pid, signal.SIGUSR1)\n    except OSError as e:\n"
                   "        print('refused', pid, e.strerror)\n")
        result = run_program(program, FAST)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.passed and not received


def test_the_source_tree_and_the_callers_files_are_out_of_reach(needs_sandbox, tmp_path):
    token = uuid.uuid4().hex
    targets = [Path(llmlab.__file__).parent / f"sandbox-{token}.py", tmp_path / f"sandbox-{token}.txt"]
    program = ("import os\n"
               f"for path in {[str(t) for t in targets]!r}:\n"
               "    print(path, 'visible' if os.path.exists(os.path.dirname(path)) else 'hidden')\n"
               "    try:\n        open(path, 'w').write('x')\n    except OSError as e:\n        print(e.strerror)\n")
    result = run_program(program, FAST)
    leaked = [t for t in targets if t.exists()]
    for t in leaked:
        t.unlink()
    assert not leaked and "visible" not in result.output and result.output.count("hidden") == 2


# -- the output is read through a pipe the evaluator owns -------------------------------------------------------
@pytest.mark.parametrize("target", ["secret", "/etc/shadow"])
def test_a_link_in_place_of_the_output_leaks_nothing(needs_sandbox, tmp_path, target):
    if target == "secret":
        path = tmp_path / "secret.txt"
        path.write_text(f"llmlab-secret-{uuid.uuid4().hex}\n")
        path.chmod(0o600)
    else:
        path = Path(target)
        if not os.access(path, os.R_OK):
            pytest.skip("the evaluator itself cannot read /etc/shadow here, so there is nothing to leak")
    secret = path.read_text().splitlines()[0]
    program = ("import os\n"
               "try:\n    os.unlink('output.txt')\nexcept OSError:\n    pass\n"
               f"os.symlink({str(path)!r}, 'output.txt')\n"
               f"try:\n    print(open({str(path)!r}).read())\n"
               "except OSError as e:\n    print('cannot read:', e.strerror)\n")
    result = run_bounded(program)
    assert secret and secret not in result.output


def test_a_fifo_in_place_of_the_output_does_not_hang_the_evaluator(needs_sandbox):
    program = ("import os\n"
               "try:\n    os.unlink('output.txt')\nexcept OSError:\n    pass\n"
               "os.mkfifo('output.txt')\nprint('made a fifo')\n")
    result = run_bounded(program)
    assert result.passed and "made a fifo" in result.output


def test_dev_zero_in_place_of_the_output_is_not_read(needs_sandbox):
    program = ("import os\n"
               "try:\n    os.unlink('output.txt')\nexcept OSError:\n    pass\n"
               "os.symlink('/dev/zero', 'output.txt')\nprint('linked')\n")
    result = run_bounded(program)  # used to raise MemoryError reading /dev/zero through the link
    assert result.passed and result.output == "linked\n"


def test_endless_output_is_capped_in_bytes(needs_sandbox):
    result = run_bounded("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                         SandboxLimits(timeout=20, max_file_mb=2))
    assert result.status == "file_size" and "output limit" in result.output
    assert len(result.output) <= 2000


# -- nothing outlives the run ----------------------------------------------------------------------------------
def test_a_setsid_daemon_does_not_outlive_the_run(needs_sandbox):
    marker = f"llmlab-daemon-{uuid.uuid4().hex}"
    program = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}])
    os._exit(0)
for _ in range(200):  # wait until the daemon runs (its command line names the marker)
    if any({marker!r}.encode() in open(f'/proc/{{p}}/cmdline', 'rb').read() for p in os.listdir('/proc')
           if p.isdigit() and os.path.exists(f'/proc/{{p}}/cmdline')):
        print('daemon up')
        break
    time.sleep(0.02)
"""
    result = run_bounded(program, SandboxLimits(timeout=10))
    left = host_processes_with(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert "daemon up" in result.output and not left


def test_total_memory_is_bounded_across_processes(needs_sandbox):
    limits = SandboxLimits(timeout=15, memory_mb=256, max_processes=8)
    program = """
import os, time
report_r, report_w = os.pipe()
children = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = b'x' * (150 * 2**20)  # written, so really held
        os.write(report_w, bytes([i]))
        time.sleep(120)
        os._exit(0)
    children.append(pid)
os.close(report_w)
time.sleep(3)
os.set_blocking(report_r, False)
try:
    reported = set(os.read(report_r, 64))
except BlockingIOError:
    reported = set()
holding = [i for i in reported if os.waitpid(children[i], os.WNOHANG) == (0, 0)]
print('children holding 150 MiB at once:', len(holding))
"""
    result = run_bounded(program, limits)
    assert "holding 150 MiB at once:" in result.output or result.status == "memory", result.output
    holding = int(result.output.rsplit(":", 1)[1]) if "holding" in result.output else 0
    assert holding * 150 <= memory_bound_mb(limits)


def test_files_in_tmp_and_dev_shm_stay_in_the_sandbox(needs_sandbox):
    token = uuid.uuid4().hex
    paths = [Path(f"/tmp/llmlab-leak-{token}"), Path(f"/dev/shm/llmlab-leak-{token}")]
    program = "".join(f"open({str(p)!r}, 'wb').write(b'x' * 2**20)\n" for p in paths) + "print('wrote')\n"
    result = run_program(program, FAST)
    leaked = [p for p in paths if p.exists()]
    for p in leaked:
        p.unlink()
    assert result.passed and "wrote" in result.output and not leaked


@pytest.mark.parametrize("folder", ["/tmp", "/dev/shm", "."])
def test_the_writable_folders_are_bounded_in_size(needs_sandbox, folder):
    program = f"for i in range(4):\n    open(f'{folder}/part{{i}}', 'wb').write(b'x' * (3 * 2**20))\n"
    result = run_program(program, SandboxLimits(timeout=5, max_file_mb=4, scratch_mb=8))
    assert result.status == "file_size" and "No space left on device" in result.output


def test_no_cgroup_is_left_behind(needs_sandbox):
    run_program("print('hi')\n", FAST)
    found = sandbox._cgroup_parents()
    dirs = found[1].values() if found else []
    prefix = f"llmlab-sandbox-{os.getpid()}-"
    assert not [c for d in dirs if d.is_dir() for c in d.iterdir() if c.name.startswith(prefix)]


# -- refusing to run unprotected --------------------------------------------------------------------------------
def test_run_program_runs_code_only_inside_a_sandbox():
    try:
        check()
    except LLMLabError as e:  # this machine cannot build one: then nothing runs at all
        with pytest.raises(LLMLabError, match="code sandbox"):
            run_program("print('unprotected')\n", FAST)
        assert str(e)
    else:  # the program is the first child of the sandbox's init, in a PID namespace of its own
        assert run_program("import os\nprint(os.getpid(), os.getppid())\n", FAST).output == "2 1\n"


def test_without_bubblewrap_run_program_refuses(monkeypatch):
    monkeypatch.setattr(sandbox, "_PROBE", {})
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(LLMLabError, match="needs bubblewrap"):
        run_program("print('unprotected')\n", FAST)


def test_a_bubblewrap_that_cannot_build_the_sandbox_makes_run_program_refuse(monkeypatch):
    monkeypatch.setattr(sandbox, "_PROBE", {})
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: "/bin/false")  # starts, builds nothing
    with pytest.raises(LLMLabError, match="cannot start here.*user namespaces"):
        run_program("print('unprotected')\n", FAST)


def test_classify_exit_codes():
    assert classify(0, "", timed_out=False) == "passed"
    assert classify(None, "", timed_out=True) == "timeout"
    assert classify(-24, "", timed_out=False) == "timeout"  # SIGXCPU
    assert classify(-9, "", timed_out=False, oom_killed=True) == "memory"  # the memory cgroup's OOM killer
    assert classify(-11, "", timed_out=False) == "crashed"
    assert classify(1, "OSError: [Errno 28] No space left on device", timed_out=False) == "file_size"
    assert classify(1, "Traceback...\nValueError: x", timed_out=False) == "failed"
