"""Run untrusted generated code (HumanEval-style completions + their tests) in a separate, limited process.

What the child process gets, and why:
- resource limits (`resource.setrlimit`): CPU seconds (an infinite loop dies of SIGXCPU), address space (a huge
  allocation raises MemoryError), number of processes (a fork bomb's forks fail), file size, no core dumps;
- a wall-clock timeout (a sleeping or blocked program is killed), then SIGKILL to its whole process group;
- no network: a new, empty network namespace (only a down loopback) when the kernel allows it (as root, or via an
  unprivileged user namespace), and in every case the `socket` module replaced before the program runs, so a
  connection attempt raises at once with a message the result reports;
- when llmlab runs as root: the program runs as the unprivileged user `nobody`, because Linux does not apply the
  process limit to root (a fork bomb would otherwise be bounded only by the timeout);
- a fresh temporary directory as working directory and HOME, an isolated interpreter (`python -I`: no user site,
  no PYTHONPATH), a minimal environment.

It is a guard against accidents of generated code, not a security boundary against a determined attacker (a program
could still read world-readable files, or leave its process group with setsid). Failures come back as a
`SandboxResult` status, never as an exception.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import LLMLabError

STATUSES = ("passed", "failed", "timeout", "memory", "processes", "network", "file_size", "crashed")
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_NOBODY = 65534
_NETWORK_MARK = "llmlab sandbox: network access is disabled"

# Runs in the child before the program: no sockets, then the program as __main__.
_BOOT = f"""
import runpy, socket, sys
class SandboxNetworkError(OSError):
    pass
def _deny(*args, **kwargs):
    raise SandboxNetworkError({_NETWORK_MARK!r})
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _deny()
socket.socket = _NoSocket
socket.create_connection = socket.getaddrinfo = socket.socketpair = socket.fromfd = _deny
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass
class SandboxLimits:
    """Limits of one program run. cpu_seconds defaults to the wall timeout (rounded up)."""

    timeout: float = 10.0
    cpu_seconds: int | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16


@dataclass
class SandboxResult:
    """How a program ended: `status` is one of STATUSES; `output` is the tail of its stdout + stderr."""

    status: str
    returncode: int | None
    output: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# -- isolation -------------------------------------------------------------------------------------------
_LIBC: ctypes.CDLL | None = None
_NET_MODE: str | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:  # loaded in the parent: no dlopen between fork and exec
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _unshare(flags: int) -> None:
    if _libc().unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _namespace_flags() -> int:
    return _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET


def network_isolation() -> str:
    """How the sandbox cuts the network here: 'namespace' (new network namespace + socket blocked) when the kernel
    lets this process create one, else 'socket-blocked' (the socket module replaced in the child only)."""
    global _NET_MODE
    if _NET_MODE is None:
        flags = _namespace_flags()
        try:
            subprocess.run(["/bin/true"], preexec_fn=lambda: _unshare(flags), check=True, timeout=30)
            _NET_MODE = "namespace"
        except (subprocess.SubprocessError, OSError):
            _NET_MODE = "socket-blocked"
    return _NET_MODE


def _runnable_by_others(path: str) -> bool:
    """True when a user with no special rights can execute `path` (the file and every folder above it)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _interpreter(drop_root: bool) -> str:
    """The Python that runs programs: this one, or (when dropping root) one that `nobody` may execute."""
    if not drop_root:
        return sys.executable
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), shutil.which("python3") or "",
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in candidates:
        if c and _runnable_by_others(c):
            return c
    raise LLMLabError("the code sandbox runs programs as user 'nobody' when llmlab runs as root (root ignores the "
                      "process limit), but no Python interpreter is executable by other users "
                      f"(tried {', '.join(c for c in candidates if c)}); install a system python3 or run as non-root")


def _child_setup(limits: SandboxLimits, net_flags: int | None, drop_root: bool):
    cpu = limits.cpu_seconds or max(1, int(-(-limits.timeout // 1)))

    def setup() -> None:  # between fork and exec, in the child
        if net_flags is not None:
            _unshare(net_flags)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.max_file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_root:
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)

    return setup


# -- running -----------------------------------------------------------------------------------------------
def classify(returncode: int | None, output: str, timed_out: bool) -> str:
    """The status of a finished run from its exit code and output (see STATUSES)."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # the CPU-time limit: soft SIGXCPU, hard SIGKILL
    if returncode == -signal.SIGXFSZ or "File too large" in output:
        return "file_size"
    if "MemoryError" in output or "Cannot allocate memory" in output or "bad_alloc" in output:
        return "memory"
    if _NETWORK_MARK in output or "Network is unreachable" in output or "name resolution" in output:
        return "network"
    if "BlockingIOError" in output and "Resource temporarily unavailable" in output:
        return "processes"  # fork or thread creation failed at the process limit
    if returncode is not None and returncode < 0:
        return "crashed"
    return "failed"


def run_program(source: str, limits: SandboxLimits | None = None, output_chars: int = 2000) -> SandboxResult:
    """Run the Python program `source` in the sandbox and report how it ended.

    `output` keeps the last `output_chars` characters of the program's stdout and stderr.
    """
    limits = limits or SandboxLimits()
    drop_root = os.geteuid() == 0
    python = _interpreter(drop_root)
    net_flags = _namespace_flags() if network_isolation() == "namespace" else None
    workdir = Path(tempfile.mkdtemp(prefix="llmlab-sandbox-"))
    start = time.monotonic()
    try:
        (workdir / "program.py").write_text(source)
        if drop_root:
            os.chown(workdir, _NOBODY, _NOBODY)
            os.chown(workdir / "program.py", _NOBODY, _NOBODY)
        log = workdir / "output.txt"
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen([python, "-I", "-c", _BOOT], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_child_setup(limits, net_flags, drop_root))
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        output = log.read_bytes()[-4 * output_chars:].decode("utf-8", "replace")[-output_chars:]
        return SandboxResult(classify(proc.returncode, output, timed_out), proc.returncode, output,
                             time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the program's process group (forked children included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
