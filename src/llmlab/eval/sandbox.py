"""Run untrusted generated code (HumanEval-style completions + their tests) inside a bubblewrap sandbox.

The mechanism is bubblewrap (`bwrap`), the sandbox Flatpak runs every desktop app in: it builds Linux namespaces
from an unprivileged user namespace, so the same command protects a normal user on a desktop and root in CI, and it
does the delicate steps (pivot_root to a fresh root, dropping every capability, no_new_privs, a reaping init)
that home-made unshare/mount code would have to get right by itself. util-linux `unshare` can create the namespaces
but not a minimal root filesystem without capabilities. Debian/Ubuntu: `apt-get install bubblewrap`.

What a program gets (see docs/evaluate.md, "Security model"):
- its own PID namespace whose init is bubblewrap: when the program's main process ends, or the timeout kills that
  init, the kernel kills every process the program started (setsid daemons too) before `run_program` returns;
- its own mount namespace: a read-only root holding only /usr, /etc, the interpreter's installation and a new /proc
  and /dev; a private, size-bounded tmpfs for its folder (`/sandbox`, its cwd and HOME), for /tmp and for /dev/shm,
  all gone when it ends. The host's /tmp, /home, /root and the source tree are not there at all;
- its own user, network (only a down loopback), IPC and UTS namespaces, no capabilities, no nested user
  namespaces; the `socket` module is also replaced, so a connection fails at once with a message the result shows;
- resource limits set by the interpreter before the program runs: CPU seconds, address space per process,
  processes (Linux ignores that limit for root, so under root the sandbox runs as `nobody`), file size, no core;
- total memory: a memory cgroup (and a pids cgroup) per run when this process may create one (root on cgroup v1,
  or on v2 where the memory controller is delegated); its limit counts every process and the tmpfs pages. Without
  one the bound is the per-process address space times the process limit, plus the three tmpfs sizes
  (`memory_bound_mb`); splitting the budget across processes instead would leave 32 MiB per process at the
  defaults and make results depend on the machine, so the per-process limit stays as it is and the bound is reported;
- its output through a pipe the parent created (never a path the program can touch), read until the wall-clock
  timeout, keeping only the tail and stopping the program past `max_file_mb`.

When bubblewrap is missing or cannot create its namespaces (unprivileged user namespaces disabled), `run_program`
raises LLMLabError instead of running the code unprotected. Anything the program itself does comes back as a
`SandboxResult` status, never as an exception.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import LLMLabError

STATUSES = ("passed", "failed", "timeout", "memory", "processes", "network", "file_size", "crashed")
WORKDIR = "/sandbox"  # the program's folder inside the sandbox: a private tmpfs, also its cwd and HOME
_NOBODY = 65534
_NETWORK_MARK = "llmlab sandbox: network access is disabled"
_OUTPUT_MARK = "llmlab sandbox: output limit reached, program stopped"
_GRACE = 10.0  # seconds to wait for a killed sandbox to be gone
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # a folder or (merged /usr) a symlink

# Runs in the sandbox before the program: hard limits it cannot raise again, no sockets, then the program.
_BOOT = f"""
import resource, runpy, socket, sys
cpu, memory, file_size, processes = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
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
    """Limits of one program run. cpu_seconds defaults to the wall timeout (rounded up); memory_mb is the total of
    all the program's processes where a memory cgroup is available, else per process (see `memory_bound_mb`);
    max_file_mb bounds one file and the program's output; scratch_mb is the size of each writable tmpfs
    (its folder, /tmp, /dev/shm)."""

    timeout: float = 10.0
    cpu_seconds: int | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    scratch_mb: int = 64


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


# -- cgroups: total memory and processes ---------------------------------------------------------------------
_CGROUP_NAMES = itertools.count()
_CGROUP_STATE: dict[str, str | None] = {}  # "missing": why no cgroup can be made here (None when one can)


def _cgroup_parents() -> tuple[str, dict[str, Path]] | None:
    """('v1', {'memory': dir, 'pids': dir}) or ('v2', {'': dir}): this process's own cgroups, where a per-run child
    would go; None when no memory controller is mounted."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, (fstype, _, options) = left.split(), right.split()[:3]
        root, point = fields[3], fields[4]
        keys = [c for c in ("memory", "pids") if c in options.split(",")] if fstype == "cgroup" else \
            [""] if fstype == "cgroup2" else []
        for key in keys:
            path = own.get(key)
            if path is not None and (root == "/" or path == root or path.startswith(root + "/")):
                mounts[key] = Path(point) / path[len(root.rstrip("/")):].lstrip("/")
    if "memory" in mounts:
        return "v1", {c: mounts[c] for c in ("memory", "pids") if c in mounts}
    if "" in mounts and (mounts[""] / "cgroup.controllers").exists():
        return "v2", {"": mounts[""]}
    return None


class _Cgroup:
    """One run's memory (+ pids) cgroup: created with its limits, entered by the child before bubblewrap starts,
    emptied and removed afterwards."""

    def __init__(self, version: str, dirs: dict[str, Path]):
        self.version, self.dirs = version, dirs

    @classmethod
    def create(cls, limits: SandboxLimits) -> _Cgroup | None:
        """A new cgroup with the limits, or None (the reason kept for `describe`) when this process may not make one."""
        if _CGROUP_STATE.get("missing"):
            return None
        try:
            found = _cgroup_parents()
            if found is None:
                raise OSError("no memory cgroup controller is mounted")
            version, parents = found
            if version == "v2":
                _enable_v2_controllers(parents[""])
            name = f"llmlab-sandbox-{os.getpid()}-{next(_CGROUP_NAMES)}"
            group = cls(version, {})
            try:
                for key, parent in parents.items():
                    (parent / name).mkdir()
                    group.dirs[key] = parent / name
                group._set_limits(limits)
            except OSError:
                group.close()
                raise
        except (OSError, ValueError) as e:  # ValueError: an unexpected /proc/self/cgroup or mountinfo line
            _CGROUP_STATE["missing"] = f"{type(e).__name__}: {e}"
            return None
        _CGROUP_STATE["missing"] = None
        return group

    def _set_limits(self, limits: SandboxLimits) -> None:
        memory = str(limits.memory_mb * 2**20)
        processes = str(limits.max_processes + 2)  # + bubblewrap's outer process and its init
        if self.version == "v1":
            _write(self.dirs["memory"] / "memory.limit_in_bytes", memory)
            _write(self.dirs["memory"] / "memory.memsw.limit_in_bytes", memory, optional=True)  # no swapping out
            if "pids" in self.dirs:
                _write(self.dirs["pids"] / "pids.max", processes)
        else:
            _write(self.dirs[""] / "memory.max", memory)
            _write(self.dirs[""] / "memory.swap.max", "0", optional=True)
            _write(self.dirs[""] / "pids.max", processes, optional=True)

    def enter(self) -> None:
        """Move the calling process (the child, before it starts bubblewrap) into the cgroup."""
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(os.getpid()))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the memory limit."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            text = (self.dirs["memory" if self.version == "v1" else ""] / name).read_text()
        except OSError:
            return 0
        return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill "))

    def close(self) -> None:
        """Kill anything still inside (normally nothing: the PID namespace is gone), then remove the cgroup."""
        for d in self.dirs.values():
            deadline = time.monotonic() + _GRACE
            while time.monotonic() < deadline:
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                for pid in pids:
                    _signal(pid, signal.SIGKILL)
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.01)


def _enable_v2_controllers(parent: Path) -> None:
    """Make memory and pids available to children of `parent` (cgroup v2); raises OSError where not allowed."""
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    missing = [c for c in ("memory", "pids") if c not in enabled]
    if missing:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        if not optional:
            raise


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the bubblewrap command ------------------------------------------------------------------------------------
_PROBE: dict[str, str] = {}  # "error": why no sandbox can run here ("" when one can); "bwrap": its path; "version"


def _runnable(path: str, by_others: bool) -> bool:
    """True when the sandbox user can execute `path`: `nobody` (the file and every folder above it open to others)
    when llmlab runs as root, else this user."""
    real = Path(os.path.realpath(path))
    try:
        if not by_others:
            return real.is_file() and os.access(real, os.X_OK)
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _interpreter(drop_root: bool) -> str:
    """The real path of the Python that runs programs: this one when the sandbox user may execute it (no venv: the
    program sees the standard library only), else a system python3."""
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), shutil.which("python3") or "",
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in candidates:
        if c and _runnable(c, by_others=drop_root):
            return os.path.realpath(c)
    who = "user 'nobody' (llmlab runs as root, and root ignores the process limit)" if drop_root else "this user"
    raise LLMLabError(f"the code sandbox needs a Python interpreter that {who} may execute; tried "
                      f"{', '.join(c for c in candidates if c)}; install a system python3")


def _bwrap_argv(bwrap: str, python: str, limits: SandboxLimits, program_fd: int, info_fd: int) -> list[str]:
    """The bubblewrap command line that runs `_BOOT` (then program.py, read from `program_fd`) in a fresh sandbox."""
    scratch = str(limits.scratch_mb * 2**20)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR,
            "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for top in _SYSTEM_DIRS:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefix = str(Path(python).parent.parent)  # .../bin/python3.x -> its installation (stdlib, libpython)
    if not any(prefix == d or prefix.startswith(d + "/") for d in ("/usr", "/etc", *_SYSTEM_DIRS)):
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for folder in ("/tmp", "/dev/shm", WORKDIR):
        argv += ["--size", scratch, "--tmpfs", folder]
    cpu = limits.cpu_seconds or max(1, int(-(-limits.timeout // 1)))
    argv += ["--file", str(program_fd), f"{WORKDIR}/program.py", "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", WORKDIR, "--info-fd", str(info_fd), "--",
             python, "-I", "-c", _BOOT, str(cpu), str(limits.memory_mb * 2**20), str(limits.max_file_mb * 2**20),
             str(limits.max_processes)]
    return argv


def _child_setup(cgroup: _Cgroup | None, drop_root: bool):
    def setup() -> None:  # between fork and exec of bubblewrap, in the child
        if cgroup is not None:
            cgroup.enter()
        if drop_root:
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)

    return setup


def check() -> None:
    """Raise LLMLabError, saying why and what to install, unless the sandbox can run here (tried once per process)."""
    if "error" not in _PROBE:
        _PROBE["error"] = _probe()
    if _PROBE["error"]:
        raise LLMLabError(_PROBE["error"])


def _probe() -> str:
    if sys.platform != "linux" or not hasattr(os, "memfd_create"):
        return f"the code sandbox needs Linux (bubblewrap namespaces); this is {sys.platform}"
    bwrap = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")
    if bwrap is None:
        return ("the code sandbox needs bubblewrap ('bwrap' not found on PATH); install it (Debian/Ubuntu: "
                "apt-get install bubblewrap, Fedora: dnf install bubblewrap) before evaluating code tasks")
    try:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"the code sandbox cannot run {bwrap}: {e}"
    version = version.strip().split("\n")[0]
    _PROBE["bwrap"], _PROBE["version"] = bwrap, version or bwrap
    try:
        result = _run("pass", SandboxLimits(timeout=30), 2000)
    except LLMLabError as e:
        return str(e)
    if result.status != "passed":
        why = result.output.strip()[-300:] or f"status {result.status}, exit code {result.returncode}"
        return (f"the code sandbox cannot start here ({_PROBE['version']}): {why}; "
                "bubblewrap needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0, and on Ubuntu an AppArmor profile that allows bwrap)")
    return ""


def memory_bound_mb(limits: SandboxLimits) -> int:
    """The most memory (MiB) a run with `limits` can hold here, tmpfs files included: `memory_mb` under a memory
    cgroup, else address space per process x processes + the three tmpfs."""
    group = _Cgroup.create(limits)
    if group is not None:
        group.close()
        return limits.memory_mb
    return limits.memory_mb * limits.max_processes + 3 * limits.scratch_mb


def describe() -> str:
    """One line for results.json: the mechanism and how total memory is bounded here."""
    check()
    group = _Cgroup.create(SandboxLimits())
    if group is not None:
        group.close()
        memory = f"memory+pids cgroup {group.version} (total)"
    else:
        memory = f"no memory cgroup ({_CGROUP_STATE.get('missing')}): rlimit address space x processes"
    return (f"{_PROBE['version']}: user/pid/mount/net/ipc/uts namespaces"
            f"{', uid nobody' if os.geteuid() == 0 else ''}; {memory}")


# -- running -----------------------------------------------------------------------------------------------
def classify(returncode: int | None, output: str, timed_out: bool, oom_killed: bool = False) -> str:
    """The status of a finished run from its exit code (negative: killed by that signal), output, and whether the
    wall timeout or the memory cgroup killed something (see STATUSES)."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if _OUTPUT_MARK in output:
        return "file_size"
    if oom_killed:
        return "memory"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # the CPU-time limit: soft SIGXCPU, hard SIGKILL
    if returncode == -signal.SIGXFSZ or "File too large" in output or "No space left on device" in output:
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

    `output` keeps the last `output_chars` characters of the program's stdout and stderr. Raises LLMLabError only
    when no sandbox can be built here (see `check`); whatever the program does ends as a status.
    """
    check()
    return _run(source, limits or SandboxLimits(), output_chars)


def _run(source: str, limits: SandboxLimits, output_chars: int) -> SandboxResult:
    drop_root = os.geteuid() == 0
    python = _interpreter(drop_root)
    start = time.monotonic()
    cgroup = _Cgroup.create(limits)
    out_r, out_w = os.pipe()
    info_r, info_w = os.pipe()
    program = os.memfd_create("program.py")
    try:
        with open(program, "wb", closefd=False) as f:
            f.write(source.encode("utf-8", "replace"))
        os.lseek(program, 0, os.SEEK_SET)
        argv = _bwrap_argv(_PROBE["bwrap"], python, limits, program, info_w)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w,
                                    env={"PATH": "/usr/bin:/bin"}, pass_fds=(program, info_w),
                                    preexec_fn=_child_setup(cgroup, drop_root))
        except (OSError, subprocess.SubprocessError) as e:  # before any program code: the machine, not the program
            raise LLMLabError(f"the code sandbox could not start {argv[0]}: {e}") from e
        finally:
            for fd in (out_w, info_w, program):
                os.close(fd)
        watch = _Watch(proc, limits, keep=4 * output_chars)
        timed_out = watch.follow(out_r, info_r, deadline=start + limits.timeout)
        raw = proc.returncode
        returncode = 128 - raw if raw is not None and raw > 128 else raw  # bwrap reports signal N as 128 + N
        output = bytes(watch.tail).decode("utf-8", "replace")
        if watch.over_output:
            output += f"\n{_OUTPUT_MARK} (more than {limits.max_file_mb} MiB)"
        output = output[-output_chars:]
        oom = cgroup is not None and cgroup.oom_kills() > 0
        return SandboxResult(classify(returncode, output, timed_out, oom), returncode, output,
                             time.monotonic() - start)
    finally:
        for fd in (out_r, info_r):
            os.close(fd)
        if cgroup is not None:
            cgroup.close()


class _Watch:
    """Follows one bubblewrap run: its output pipe (tail kept, total capped), its info pipe (the host PID of the
    sandbox's init), the wall-clock deadline; kills the sandbox and waits until its last process is gone."""

    def __init__(self, proc: subprocess.Popen, limits: SandboxLimits, keep: int):
        self.proc, self.keep, self.cap = proc, keep, limits.max_file_mb * 2**20
        self.tail, self.total, self.over_output = bytearray(), 0, False
        self.info, self.init_fd = b"", None

    def follow(self, out_r: int, info_r: int, deadline: float) -> bool:
        """Read until the sandbox ends or is stopped; True when the wall timeout stopped it."""
        open_fds, timed_out, stop_at = {out_r, info_r}, False, None
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        while open_fds:
            now = time.monotonic()
            if stop_at is None and now >= deadline:
                timed_out, stop_at = True, self._stop()
            if stop_at is not None and now >= stop_at:
                break  # a process that ignores SIGKILL (stuck in the kernel): give up on its output
            wait = (deadline if stop_at is None else stop_at) - now
            for fd, _ in poller.poll(max(0, int(wait * 1000) + 1)):
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                    poller.unregister(fd)
                    if fd == info_r:
                        self._find_init()
                elif fd == info_r:
                    self.info += data[:65536 - len(self.info)]
                else:
                    self.total += len(data)
                    self.tail += data
                    del self.tail[:-self.keep]
                    if self.total > self.cap and stop_at is None:
                        self.over_output, stop_at = True, self._stop()
        self._reap()
        return timed_out

    def _find_init(self) -> None:
        """Open a pidfd on the sandbox's init (named by bubblewrap's info), checking it is bubblewrap's child."""
        try:
            pid = int(json.loads(self.info)["child-pid"])
            fd = os.pidfd_open(pid)
        except (ValueError, KeyError, TypeError, OSError, AttributeError):
            return
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            ppid = -1
        if ppid == self.proc.pid:
            self.init_fd = fd
        else:
            os.close(fd)  # init already gone and its number reused: never signal that process

    def _stop(self) -> float:
        """SIGKILL the sandbox's init (the kernel then kills all its processes); returns when to stop waiting."""
        if self.init_fd is None and self.proc.poll() is None:
            self._find_init()
        if self.init_fd is not None:
            try:
                signal.pidfd_send_signal(self.init_fd, signal.SIGKILL)
            except OSError:
                pass
        elif self.proc.poll() is None:
            _signal(self.proc.pid, signal.SIGKILL)  # --die-with-parent takes the init down with it
        return time.monotonic() + _GRACE

    def _reap(self) -> None:
        """Wait for bubblewrap, which exits only once its init has, and the init exits only once every process of
        its PID namespace has been reaped."""
        try:
            self.proc.wait(timeout=_GRACE)
        except subprocess.TimeoutExpired:
            self._stop()
            _signal(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.init_fd is not None:
            poller = select.poll()
            poller.register(self.init_fd, select.POLLIN)
            poller.poll(int(_GRACE * 1000))  # readable once the init has exited
            os.close(self.init_fd)
