"""Run one untrusted job in an isolated process and bring back what it did. The grader's side of the sandbox.

Isolation per execution (set up by the trusted code in `_zygote.py`, see docs/sandbox.md):
  - fresh pid, mount, network, ipc and uts namespaces: the payload is pid 1 of its own pid namespace, so when it
    dies (exit, crash, or our SIGKILL at the wall-clock limit) the kernel kills every process it started;
    the network namespace has no interface but a downed loopback;
  - a read-only root (pivot_root, entered once by the zygote) holding /usr, /lib*, /bin, /etc, the interpreter at
    /python with its site-packages hidden, and `PACKAGES_DIR` at /packages only: no /work, /root, /home, host /tmp,
    no /proc, no host path in the mount table or the interpreter's state; a private size-capped tmpfs `/scratch` as
    cwd that vanishes with the namespace;
  - an unprivileged identity (no capabilities, no supplementary groups, no_new_privs), RLIMIT_CPU / AS / FSIZE /
    NPROC / NOFILE / CORE, and a seccomp filter denying the system calls a program has no use for (`_seccomp.py`);
  - stdout, stderr and the result channel are pipes read here with byte caps; a stream past its cap is closed.
The job travels in a memfd the payload reads itself, so its data never enters the long-lived zygote.

Isolation modes (`Sandbox(isolation=...)`, or the GQ_SANDBOX_ISOLATION environment variable): "root" (as root:
a uid of its own per execution), "userns" (without root, where the kernel allows user namespaces: a user namespace
per execution, no capabilities), "auto" (the default: root when running as root, else userns) and "unisolated" (an
explicit opt-in: no namespaces, no new root, the grader's own uid; the rlimits, the filter and a temporary cwd
only). A Sandbox checks its mode by running a probe program before it is returned, and raises SandboxUnavailable,
naming what each mode lacks, when none works.

Two launchers, same isolation and the same results: "zygote" (a pre-warmed fresh interpreter forks one guard per
execution, prepared ahead of its job; the default) and "spawn" (a fresh interpreter per execution; the baseline the
benchmark compares to).
"""

from __future__ import annotations

import base64
import compileall
import functools
import json
import logging
import marshal
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
ZYGOTE_SCRIPT = os.path.join(_HERE, "_zygote.py")
# Third-party packages a sandboxed program may import (sortedcontainers), read-only at /packages inside; see SOURCE.md
PACKAGES_DIR = os.path.join(_HERE, "sandbox_packages")
# Never visible inside: the package's data (problems with their expected answers). A Sandbox refuses to start when
# one of these would lie in a directory it binds (a plain install under /usr, say); callers may add their own.
PROTECTED_PATHS = (os.path.join(_HERE, "data"),)
ISOLATIONS = ("auto", "root", "userns", "unisolated")
ISOLATION_ENV = "GQ_SANDBOX_ISOLATION"
_START_TIMEOUT_S = 30.0
_PROBE_JOB = {"kind": "oracle", "program": "print('ok')\n", "setup_code": "", "method": "f", "inputs": []}
_log = logging.getLogger(__name__)
_FD_NAMES = ("job", "result", "stdout", "stderr", "status")
_STATUS_CAP = 1 << 16
DEFAULT_UID_BASE = 2_000_000
MAX_UID = (1 << 32) - 2
_GRACE_S = 5.0  # beyond the guard's own wall clock, before the grader kills the execution itself


@dataclass(frozen=True)
class SandboxLimits:
    """Per-execution limits. cpu_s and wall_s cover the whole job (the program and all its test calls)."""

    cpu_s: int = 4
    wall_s: float = 6.0
    memory_bytes: int = 1 << 30  # RLIMIT_AS, per process
    fsize_bytes: int = 1 << 20  # largest file a process may write
    nproc: int = 4  # processes + threads of the execution's uid (memory worst case: nproc * memory_bytes)
    nofile: int = 64
    scratch_bytes: int = 4 << 20  # tmpfs size of /scratch
    scratch_inodes: int = 256
    stdout_cap: int = 256 << 10
    stderr_cap: int = 16 << 10
    # The result channel: all its bytes, and one record (line) of it, which the grader refuses before parsing when
    # longer (reward.records): parsing a record costs the grader up to ~50x its size in memory. The largest shipped
    # problem's results take 174 KB in all and 30 KB in one record.
    result_cap: int = 4 << 20
    record_cap: int = 256 << 10

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class Execution:
    """What one execution did, as observed from outside it. Nothing here was decided by the untrusted process
    except the bytes it wrote: `records` (result channel), `stdout`, `stderr` and `files` are its raw output."""

    exit_code: int | None  # None when killed by a signal or never reported
    signal: int | None
    timed_out: bool
    cpu_s: float
    records: bytes  # the raw result channel (at most limits.result_cap bytes) when run without a reader, else b""
    stdout: bytes
    stderr: bytes
    files: dict[str, bytes] = field(default_factory=dict)  # collected scratch files (first 4 KiB each)
    overflow: tuple[str, ...] = ()  # streams closed at their cap
    sandbox_error: str = ""  # the sandbox itself failed (never the program's doing); empty when all went well

    def describe_end(self) -> str:
        """How the process ended, in words (for verdict reasons)."""
        if self.sandbox_error:
            return f"sandbox error: {self.sandbox_error}"
        if self.timed_out:
            return "killed at the wall-clock limit"
        if self.signal is not None:
            name = signal.Signals(self.signal).name if self.signal in signal.valid_signals() else str(self.signal)
            return f"killed by {name}" + (" (CPU limit)" if self.signal == signal.SIGXCPU else "")
        return f"exit code {self.exit_code}"


class SandboxUnavailable(RuntimeError):
    """No requested isolation mode works on this host. `problems`: what each mode tried lacks."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "the sandbox cannot isolate untrusted code on this host: " + "; ".join(problems) + ". To grade without "
            f"isolation anyway (the programs then run as this user, seeing its files), pass isolation='unisolated' "
            f"or set {ISOLATION_ENV}=unisolated.")


def _uid_map() -> list[tuple[int, int, int]]:
    """This process's user namespace's uid map: (first uid inside, first uid outside, count) ranges."""
    try:
        with open("/proc/self/uid_map") as f:
            return [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return [(0, 0, 1 << 32)]


def _in_initial_user_namespace() -> bool:
    """True for the host's own user namespace (root there is the real root); False inside a container's, where
    root is some unprivileged uid of the host and userns mode is what isolates."""
    return _uid_map() == [(0, 0, 4294967295)]


def _host_problems(isolation: str, uid_base: int) -> list[str]:
    """What this host visibly lacks for `isolation` (before trying it)."""
    problems = []
    if sys.platform != "linux":
        problems.append(f"Linux is required (platform is {sys.platform})")
        return problems
    if not hasattr(os, "pidfd_open") or not hasattr(os, "memfd_create"):
        problems.append("os.pidfd_open and os.memfd_create are required (Python >= 3.9 on Linux >= 5.3)")
    sys.path.insert(0, _HERE)
    try:
        import _seccomp
    finally:
        sys.path.remove(_HERE)
    if _seccomp.supported() and isolation != "unisolated":
        problems.append(_seccomp.supported())
    if isolation == "root" and os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()})")
    elif isolation == "root" and not any(first <= uid_base and uid_base + (1 << 22) <= first + count
                                         for first, _, count in _uid_map()):
        problems.append(f"the execution uids {uid_base}.. are not mapped in this user namespace (root of a "
                        "container's user namespace, not of the host)")
    if isolation == "userns" and os.geteuid() == 0 and _in_initial_user_namespace():
        problems.append("running as root: root mode applies (in a user namespace of root's, the programs would "
                        "still be root on the host's files, without capabilities)")
    for path in (ZYGOTE_SCRIPT, PACKAGES_DIR):
        if not os.path.exists(path):
            problems.append(f"missing {path}")
    return problems


def _userns_hint() -> str:
    """The kernel settings that commonly forbid unprivileged user namespaces, when one of them does."""
    for path, bad in (("/proc/sys/kernel/unprivileged_userns_clone", "0"), ("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return f" ({path.removeprefix('/proc/sys/').replace('/', '.')}={bad})"
        except OSError:
            pass
    return ""


class SandboxRefused(RuntimeError):
    """The sandbox would show a protected path (the package's data) to the programs it runs."""


@functools.lru_cache(maxsize=1)
def isolation_problems() -> tuple[str, ...]:
    """Why no isolating mode works on this host (empty when one does). Starts, probes and closes one Sandbox."""
    try:
        Sandbox(isolation="auto").close()
    except SandboxUnavailable as e:
        return tuple(e.problems)
    return ()


def _interpreter() -> str:
    """The base interpreter (not a venv's): the payload sees only the stdlib, never site-packages of the project."""
    return getattr(sys, "_base_executable", None) or sys.executable


class Sandbox:
    """Runs jobs (dicts for `_harness.run_job`) in isolated executions; safe to call `run` from many threads.

    A job travels marshalled, so it may hold code objects (the oracle's compiled test inputs): marshal data is
    trusted here because only this grader writes it, and the sandbox runs this interpreter's own base interpreter
    (same version, same marshal format). The payload loads it before any candidate code runs."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), launcher: str = "zygote",
                 uid_base: int = DEFAULT_UID_BASE, isolation: str | None = None, protected_paths: tuple[str, ...] = ()):
        """`isolation`: one of ISOLATIONS (None: $GQ_SANDBOX_ISOLATION, else "auto"). `uid_base` ("root" only): each
        execution runs as uid `uid_base + <its guard's pid>` (distinct while it lives). `protected_paths`: paths that
        must not be visible inside, beside PROTECTED_PATHS. Starts the sandbox and runs a probe program in it;
        raises SandboxUnavailable when no requested mode works, naming what each lacks."""
        if launcher not in ("zygote", "spawn"):
            raise ValueError(f"launcher must be 'zygote' or 'spawn', got {launcher!r}")
        if not 1_000_000 <= uid_base <= MAX_UID - (1 << 22):
            raise ValueError(f"uid_base must be in [1e6, {MAX_UID - (1 << 22)}] (above real users, room for any "
                             f"pid), got {uid_base}")
        requested = isolation or os.environ.get(ISOLATION_ENV) or "auto"
        if requested not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {requested!r}"
                             + ("" if isolation else f" (from ${ISOLATION_ENV})"))
        self.uid_base = uid_base
        self.limits = limits
        self.launcher = launcher
        self.protected_paths = tuple(PROTECTED_PATHS) + tuple(str(p) for p in protected_paths)
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._zygote_stderr = None
        # bytecode next to the packages' sources: the payload cannot write it (read-only), and compiling
        # sortedcontainers takes ~70 ms, against ~3 ms to load it compiled
        compileall.compile_dir(PACKAGES_DIR, quiet=2)
        problems = []
        for candidate in (("root", "userns") if requested == "auto" else (requested,)):
            self.isolation = candidate
            why = self._problems_running_here()
            if not why:
                break
            problems.append(f"{candidate} mode: {why}")
        else:
            raise SandboxUnavailable(problems)
        if self.isolation == "unisolated":
            _log.warning("the sandbox runs UNISOLATED: graded programs run as this user (uid %d) and can read its "
                         "files, the expected answers included", os.geteuid())

    def _problems_running_here(self) -> str:
        """Start in mode `self.isolation` and run the probe program; "" when it ran as it should, else why not
        (and the sandbox is closed again)."""
        problems = _host_problems(self.isolation, self.uid_base)
        if problems:
            return "; ".join(problems)
        try:
            execution = self.run(_PROBE_JOB)
        except SandboxUnavailable as e:
            why = "; ".join(e.problems)
        else:
            if execution.exit_code == 0 and execution.stdout == b"ok\n" and not execution.sandbox_error:
                return ""
            why = (execution.sandbox_error or execution.stderr.decode("utf-8", "replace").strip()
                   or f"the probe program ended with {execution.describe_end()}")
        self.close()
        if why.startswith("refused: "):
            raise SandboxRefused("refusing to start the sandbox: " + why.removeprefix("refused: "))
        why = why.removeprefix("error: ")
        if "CLONE_NEWUSER" in why:
            why += _userns_hint()
        return why

    # ---- zygote lifecycle ----
    def _ensure_zygote(self) -> socket.socket:
        if self._zygote is not None and self._zygote.poll() is None:
            return self._control
        self._stop_zygote()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._zygote_stderr = tempfile.TemporaryFile()  # read only when the start fails
        self._zygote = subprocess.Popen(
            [_interpreter(), "-I", "-S", ZYGOTE_SCRIPT, "--zygote", str(theirs.fileno()), self._config()],
            pass_fds=[theirs.fileno()], env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._zygote_stderr, start_new_session=True)
        theirs.close()
        self._control = ours
        ours.settimeout(_START_TIMEOUT_S)
        try:
            hello = ours.recv(1 << 16)
        except OSError as e:  # a timeout
            hello = f"error: no word from the zygote ({type(e).__name__}: {e})".encode()
        ours.settimeout(None)
        if hello != b"ready":
            self._zygote_stderr.seek(0)
            stderr = self._zygote_stderr.read()[-2000:].decode("utf-8", "replace").strip()
            self._stop_zygote()
            why = hello.decode("utf-8", "replace") or f"the zygote exited: {stderr}"
            raise SandboxUnavailable([why])
        return ours

    def _config(self) -> str:
        """What every execution of this sandbox shares, given to the zygote (or the `--once` guard) at its start."""
        return json.dumps({"limits": asdict(self.limits), "uid_base": self.uid_base, "isolation": self.isolation,
                           "packages_dir": PACKAGES_DIR, "protected": list(self.protected_paths)})

    def start(self) -> None:
        """Start the zygote now (otherwise the first `run` does). Idempotent."""
        if self.launcher == "zygote":
            with self._lock:
                self._ensure_zygote()

    @property
    def zygote_pid(self) -> int | None:
        """Pid of the live zygote (None before start, after close, or with the spawn launcher)."""
        alive = self._zygote is not None and self._zygote.poll() is None
        return self._zygote.pid if alive else None

    def _stop_zygote(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._zygote is not None:
            self._zygote.kill()
            self._zygote.wait()
            self._zygote = None
        if self._zygote_stderr is not None:
            self._zygote_stderr.close()
            self._zygote_stderr = None

    def close(self) -> None:
        """Stop the zygote (its running guards and payloads die with it through PDEATHSIG)."""
        with self._lock:
            self._stop_zygote()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one execution ----
    def run(self, job: dict, collect: tuple[str, ...] = (), reader: Callable[[bytes], bool] | None = None) -> Execution:
        """Run `job` isolated; return what it did. Raises only for a sandbox failure, never for the program's.

        `reader(chunk)` receives each new chunk of the result channel once (a `reward.records.RecordReader`); once
        it returns True the channel is closed, so the payload dies at its next write (SIGPIPE/EPIPE): a run is cut
        at its first wrong answer. Without a reader, the raw channel comes back in `Execution.records`."""
        for name in collect:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"collect names a file in the scratch dir, got {name!r}")
        job_fd = os.memfd_create("gq-job", os.MFD_CLOEXEC)
        os.write(job_fd, marshal.dumps(job))
        os.lseek(job_fd, 0, os.SEEK_SET)
        pipes = {name: os.pipe() for name in ("result", "stdout", "stderr", "status")}
        child_ends = {"job": job_fd, **{name: w for name, (r, w) in pipes.items()}}
        ours = {name: r for name, (r, w) in pipes.items()}
        request = {"collect": list(collect), "fd_names": list(_FD_NAMES)}
        spawned = None
        try:
            if self.launcher == "zygote":
                with self._lock:
                    control = self._ensure_zygote()
                    socket.send_fds(control, [json.dumps(request).encode()], [child_ends[n] for n in _FD_NAMES])
            else:
                fd_numbers = [child_ends[n] for n in _FD_NAMES]
                spawned = subprocess.Popen(
                    [_interpreter(), "-I", "-S", ZYGOTE_SCRIPT, "--once", self._config(),
                     json.dumps({**request, "fd_numbers": fd_numbers})],
                    pass_fds=fd_numbers, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                    start_new_session=True)
        finally:
            for fd in child_ends.values():
                os.close(fd)
        try:
            return self._collect(ours, reader)
        finally:
            for fd in ours.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            if spawned is not None:
                spawned.kill()
                spawned.wait()

    def _collect(self, fds: dict[str, int], reader: Callable[[bytes], bool] | None) -> Execution:
        caps = {"result": self.limits.result_cap, "stdout": self.limits.stdout_cap,
                "stderr": self.limits.stderr_cap, "status": _STATUS_CAP}
        data = {name: bytearray() for name in fds}
        received = dict.fromkeys(fds, 0)
        overflow = []
        deadline = time.monotonic() + self.limits.wall_s + _GRACE_S
        with selectors.DefaultSelector() as selector:
            for name, fd in fds.items():
                selector.register(fd, selectors.EVENT_READ, name)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._emergency_kill(data["status"])
                    return self._execution(data, overflow, "the guard did not finish in time; execution killed")
                for key, _ in selector.select(remaining):
                    name = key.data
                    chunk = os.read(key.fd, 1 << 16)
                    room = caps[name] - received[name]
                    kept = chunk[:room]
                    received[name] += len(kept)
                    if name == "result" and reader is not None:
                        stop = bool(kept) and reader(kept)
                    else:
                        data[name] += kept
                        stop = False
                    if stop:
                        selector.unregister(key.fd)
                        os.close(key.fd)
                        fds[name] = -1
                    elif not chunk or len(chunk) > room:
                        selector.unregister(key.fd)
                        if chunk:  # past the cap: closing our end makes further writes fail (SIGPIPE/EPIPE)
                            overflow.append(name)
                            os.close(key.fd)
                            fds[name] = -1
        return self._execution(data, overflow, "")

    @staticmethod
    def _status_records(raw: bytes) -> dict:
        status = {}
        for line in raw.splitlines():
            try:
                status.update(json.loads(line))
            except ValueError:
                status["guard_error"] = "unreadable status record"
        return status

    def _execution(self, data: dict, overflow: list[str], error: str) -> Execution:
        status = self._status_records(bytes(data["status"]))
        if not error and "guard_error" in status:
            error = status["guard_error"]
        if not error and "exit_code" not in status:
            error = "the guard reported no exit status"
        if "status" in overflow:
            error = error or "status channel overflow"
        return Execution(
            exit_code=status.get("exit_code"), signal=status.get("signal"),
            timed_out=bool(status.get("timed_out", False)), cpu_s=float(status.get("cpu_s", 0.0)),
            records=bytes(data["result"]), stdout=bytes(data["stdout"]), stderr=bytes(data["stderr"]),
            files={name: base64.b64decode(b64) for name, b64 in status.get("files", {}).items()},
            overflow=tuple(name for name in overflow if name != "status"), sandbox_error=error)

    def _emergency_kill(self, raw_status: bytearray) -> None:
        status = self._status_records(bytes(raw_status))
        for key in ("payload_pid", "guard_pid"):
            if isinstance(status.get(key), int):
                try:
                    os.kill(status[key], signal.SIGKILL)
                except ProcessLookupError:
                    pass
