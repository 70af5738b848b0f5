"""The code sandbox stops runaway programs and reports them as failures with a reason, never as a crash."""

from __future__ import annotations

import sys

import pytest

from llmlab.eval.sandbox import SandboxLimits, classify, network_isolation, run_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux resource limits")
FAST = SandboxLimits(timeout=3, memory_mb=512, max_processes=16)


def test_a_passing_program_passes_and_its_output_comes_back():
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('all good')\n", FAST)
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert "all good" in result.output


def test_a_failing_assertion_is_a_failure():
    result = run_program("assert 1 + 1 == 3, 'wrong sum'\n", FAST)
    assert result.status == "failed" and not result.passed
    assert "AssertionError: wrong sum" in result.output


def test_an_infinite_loop_is_stopped():
    result = run_program("while True:\n    pass\n", FAST)
    assert result.status == "timeout"
    assert result.seconds < 30  # stopped, not left running (the CPU limit or the wall timeout, whichever is first)


def test_a_sleeping_program_is_stopped_by_the_wall_timeout():
    result = run_program("import time\ntime.sleep(600)\n", SandboxLimits(timeout=1))
    assert result.status == "timeout"


def test_a_fork_bomb_hits_the_process_limit():
    result = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    assert result.status == "processes" and not result.passed  # the forks fail at the limit, before the timeout
    assert "Resource temporarily unavailable" in result.output


def test_a_huge_allocation_is_a_memory_failure():
    result = run_program("block = bytearray(64 * 2**30)\n", FAST)
    assert result.status == "memory" and "MemoryError" in result.output


def test_network_calls_fail():
    program = "import socket\nsocket.create_connection(('93.184.215.14', 80), timeout=2)\n"
    result = run_program(program, FAST)
    assert result.status == "network" and "network access is disabled" in result.output


def test_network_is_cut_even_below_the_socket_module():
    if network_isolation() != "namespace":
        pytest.skip("no network namespace here; only the socket module is blocked")
    program = "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('93.184.215.14', 80))\n"
    result = run_program(program, FAST)
    assert result.status == "network" and "Network is unreachable" in result.output


def test_writing_a_huge_file_is_stopped():
    result = run_program("open('big.bin', 'wb').write(b'x' * (64 * 2**20))\n", SandboxLimits(timeout=5, max_file_mb=4))
    assert result.status == "file_size"


def test_the_program_runs_in_its_own_temporary_folder():
    result = run_program("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('x')\n", FAST)
    assert result.passed and "llmlab-sandbox-" in result.output


def test_classify_exit_codes():
    assert classify(0, "", timed_out=False) == "passed"
    assert classify(None, "", timed_out=True) == "timeout"
    assert classify(-24, "", timed_out=False) == "timeout"  # SIGXCPU
    assert classify(-11, "", timed_out=False) == "crashed"
    assert classify(1, "Traceback...\nValueError: x", timed_out=False) == "failed"
