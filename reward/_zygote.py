"""Trusted process side of the sandbox: the zygote, the guard and the payload set-up. Runs in a FRESH interpreter.

Never imported by the grader process: `reward.sandbox` starts `python -I -S _zygote.py ...`, so this process holds
nothing of the grader's memory (no expected values, no other samples). Roles, one execution:

  zygote  (root, pre-warmed, long-lived)  keeps one guard prepared ahead of the next job; hands each control message
                                           + the job's pipe fds (SCM_RIGHTS) to that guard, then prepares the next
    guard (root, trusted)                  unshares pid/mount/net/ipc/uts namespaces, builds a read-only chroot with a
                                           size-capped tmpfs scratch and forks the payload, all BEFORE its job
                                           exists; then passes the job's fds to the payload, enforces the wall clock,
                                           reports exit status + collected scratch files on the status pipe
      payload (pid 1 of its namespace)     mounts /proc, chroots, setsid, drops to a per-execution uid, sets
                                           rlimits and no_new_privs, warms up (`_harness.warm_up`), then waits for
                                           its job's fds; reads its job from the memfd, runs `_harness.run_job`

Preparing the guard ahead moves the forks, namespaces and mounts off the job's critical path (they overlap the
previous execution); it changes nothing a payload can observe: each guard and payload serves exactly one job, and
both are forked from the zygote, which never holds job data. The job data goes parent -> payload through an fd, so
a payload carries no state of earlier samples. When the payload (its namespace's init) dies, the kernel kills
every process of the namespace: no stray process can outlive an execution. `--once` runs the guard directly in
this fresh interpreter, handing it the job at once (the fresh-interpreter-per-execution baseline).
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import marshal
import os
import resource
import select
import signal
import socket
import stat
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (pre-warms the modules every problem's setup code imports)

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

# Where the guard builds the new root inside its private mount namespace (hidden from the host by MS_PRIVATE).
NEW_ROOT = "/tmp"
READONLY_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin", "/etc")
PACKAGES_MOUNT = "/packages"  # where the sandbox's third-party packages (Sandbox config "packages_dir") appear
DEVICES = ("null", "zero", "urandom", "random")
FILE_COLLECT_CAP = 4096
# Fixed fd numbers inside the payload.
RESULT_FD, JOB_FD = 3, 4
# The job's fds the guard hands to its payload (the guard keeps the status fd: the program never holds it).
PAYLOAD_FD_NAMES = ("job", "result", "stdout", "stderr")
FD_LIMIT = 1 << 16  # upper end of the fd ranges closed at each role's start
SETUP_FAILED = 121  # the payload's exit code when its own set-up failed (reported on the job's stderr)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def _bind_readonly(source_fd: int, inside: str) -> None:
    """Bind the directory open as `source_fd` read-only into the new root at `inside`."""
    target = NEW_ROOT + inside
    os.makedirs(target, exist_ok=True)
    _mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(limits: dict, uid: int, packages_dir: str) -> None:
    """In a fresh private mount namespace: a read-only root holding only the system libraries, the interpreter and
    the sandbox's packages."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # first: nothing below may propagate to the host
    binds = {path: path for path in READONLY_DIRS if os.path.isdir(path) and not os.path.islink(path)}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        if not any(prefix == d or prefix.startswith(d + "/") for d in READONLY_DIRS):
            binds[prefix] = prefix
    binds[packages_dir] = PACKAGES_MOUNT
    # opened before the new root's tmpfs covers NEW_ROOT, under which a source may lie (a checkout in /tmp)
    source_fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in binds}
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in READONLY_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), NEW_ROOT + path)
    for path, inside in binds.items():
        _bind_readonly(source_fds[path], inside)
        os.close(source_fds[path])
    os.makedirs(NEW_ROOT + "/dev")
    for dev in DEVICES:
        open(f"{NEW_ROOT}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{NEW_ROOT}/dev/{dev}", None, MS_BIND)
    os.makedirs(NEW_ROOT + "/proc")
    os.makedirs(NEW_ROOT + "/scratch")
    _mount("tmpfs", NEW_ROOT + "/scratch", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={limits['scratch_bytes']},nr_inodes={limits['scratch_inodes']},mode=0700,uid={uid},gid={uid}")
    os.symlink("/scratch", NEW_ROOT + "/tmp")
    _mount(None, NEW_ROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _close_fds_except(keep: set[int]) -> None:
    """Close every fd >= 3 except those in `keep` (os.closerange over the gaps, not one close per number)."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, FD_LIMIT)


def _move_fds(mapping: dict[int, int]) -> None:
    """dup2 each source fd onto its target without clobbering a source that is another's target."""
    # copies above every target first (a plain dup could land on a target and be clobbered by an earlier dup2);
    # just above, because RLIMIT_NOFILE is already in force here
    above = max(mapping.values()) + 1
    high = {src: fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, above) for src in mapping}
    for src, dst in mapping.items():
        os.dup2(high[src], dst, inheritable=False)
    for fd in high.values():
        os.close(fd)


def _setup_failed(stderr_fd: int, error: str) -> None:
    os.write(stderr_fd, f"sandbox set-up failed: {error}\n".encode())
    os._exit(SETUP_FAILED)


def _payload(limits: dict, uid: int, channel: socket.socket, ahead: bool) -> None:
    """Pid 1 of the new pid namespace: isolate and drop privileges, then wait on `channel` for the job's fds and
    run the job. Never returns. The isolation is set up before the job exists, so a set-up failure is kept and
    reported on the job's stderr once that arrives. `ahead`: prepared ahead of its job, so warm up while waiting."""
    setup_error = ""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_fds_except({channel.fileno()})  # nothing of the guard's or the zygote's stays open here
        _mount("proc", NEW_ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.chroot(NEW_ROOT)
        os.chdir("/scratch")
        sys.path.append(PACKAGES_MOUNT)
        # a session of its own, as each `--once` execution has: no tie to the zygote's process group, and (with
        # sched autogroup) a CPU share of its own instead of one shared by every execution the zygote runs
        os.setsid()
        cpu = int(limits["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize_bytes"], limits["fsize_bytes"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if ahead:
            _harness.warm_up()
    except BaseException as e:
        setup_error = f"{type(e).__name__}: {e}"
    try:
        _, received, _, _ = socket.recv_fds(channel, 16, len(PAYLOAD_FD_NAMES))
    except BaseException:
        os._exit(SETUP_FAILED)
    if len(received) != len(PAYLOAD_FD_NAMES):  # the guard went away without a job
        os._exit(SETUP_FAILED)
    fds = dict(zip(PAYLOAD_FD_NAMES, received))
    try:
        if setup_error:
            raise RuntimeError(setup_error)
        devnull = os.open("/dev/null", os.O_RDONLY)
        _move_fds({devnull: 0, fds["stdout"]: 1, fds["stderr"]: 2, fds["result"]: RESULT_FD, fds["job"]: JOB_FD})
    except BaseException as e:
        _setup_failed(fds["stderr"], f"{type(e).__name__}: {e}")
    try:
        os.closerange(JOB_FD + 1, FD_LIMIT)  # the channel and the received copies
        os.set_inheritable(RESULT_FD, True)
        for fd in (0, 1, 2):
            os.set_inheritable(fd, True)
        chunks = []
        while chunk := os.read(JOB_FD, 1 << 20):
            chunks.append(chunk)
        os.close(JOB_FD)
        job = marshal.loads(b"".join(chunks))  # written by the trusted grader; see Sandbox.run
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": "/scratch", "TMPDIR": "/scratch"})
    except BaseException as e:
        _setup_failed(2, f"{type(e).__name__}: {e}")
    try:
        _harness.run_job(job, RESULT_FD)  # exits the process itself
    finally:
        os._exit(1)  # never fall back into the guard's or the zygote's code


def _status(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def _collect(names: list[str]) -> dict[str, str]:
    """Read (capped, regular files only, no symlinks) the named files the payload left in its scratch dir."""
    files = {}
    for name in names:
        try:
            fd = os.open(f"{NEW_ROOT}/scratch/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                files[name] = base64.b64encode(os.read(fd, FILE_COLLECT_CAP)).decode()
        finally:
            os.close(fd)
    return files


def guard(config: dict, receive: Callable[[], tuple[dict, dict[str, int]]], keep: set[int], ahead: bool) -> None:
    """Prepare one execution (namespaces, root, a waiting payload), then take its job from `receive()`, run it and
    report on the job's status fd. Never returns. `keep`: the fds to keep open (all others are closed first).
    `ahead`: prepared ahead of the job (the zygote's guards), rather than given it at once (`--once`)."""
    limits = config["limits"]
    setup_error = ""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _close_fds_except(keep)
        # uid = uid_base + the guard's pid: distinct for every live execution, so RLIMIT_NPROC (counted per uid) of
        # one sample cannot starve another, and no sandbox uid owns any file of the host.
        uid = config["uid_base"] + os.getpid()
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        _build_root(limits, uid, config["packages_dir"])
        to_payload, payload_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            to_payload.close()
            _payload(limits, uid, payload_end, ahead)
        payload_end.close()
        pidfd = os.pidfd_open(pid)
    except BaseException as e:
        setup_error = f"{type(e).__name__}: {e}"
    request, fds = receive()
    status_fd = fds["status"]
    try:
        if setup_error:
            raise RuntimeError(f"preparing the execution failed: {setup_error}")
        _status(status_fd, {"guard_pid": os.getpid(), "payload_pid": pid})
        socket.send_fds(to_payload, [b"job"], [fds[name] for name in PAYLOAD_FD_NAMES])
        for name in PAYLOAD_FD_NAMES:
            os.close(fds[name])
        to_payload.close()
        timed_out = not select.select([pidfd], [], [], limits["wall_s"])[0]
        if timed_out:
            os.kill(pid, signal.SIGKILL)  # the namespace's init: the kernel kills every process in it
        _, wait_status, usage = os.wait4(pid, 0)
        _status(status_fd, {
            "exit_code": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
            "signal": os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None,
            "timed_out": timed_out,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "files": _collect(request["collect"]),
        })
    except BaseException as e:
        _status(status_fd, {"guard_error": f"{type(e).__name__}: {e}"})
    os.close(status_fd)  # the grader's read ends here, not after this process's teardown
    os._exit(0)


def _receive_job(channel: socket.socket) -> Callable[[], tuple[dict, dict[str, int]]]:
    """A prepared guard's `receive`: the control message and fds the zygote forwards (exit if none ever come)."""
    def receive() -> tuple[dict, dict[str, int]]:
        msg, fd_list, _, _ = socket.recv_fds(channel, 1 << 16, 8)
        channel.close()
        if not msg:  # the zygote is closing: nothing to run
            os._exit(0)
        request = json.loads(msg)
        return request, dict(zip(request["fd_names"], fd_list))
    return receive


def _prepare_guard(control: socket.socket, config: dict) -> socket.socket:
    """Fork the guard of the next job: it prepares its execution now and waits for the job on the returned socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        control.close()
        ours.close()
        guard(config, _receive_job(theirs), keep={theirs.fileno()}, ahead=True)
    theirs.close()
    return ours


def zygote(control_fd: int, config: dict) -> None:
    """Hand each control message and its fds to the prepared guard, close them here, prepare the next guard.

    Exits when the grader closes (or dies, closing) the control socket; the prepared guard then sees its socket
    close and exits too. Not PR_SET_PDEATHSIG: that fires when the grader THREAD that started the zygote exits,
    e.g. a pool worker."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # guards are reaped by the kernel
    control = socket.socket(fileno=control_fd)
    prepared = _prepare_guard(control, config)
    while True:
        msg, fd_list, _, _ = socket.recv_fds(control, 1 << 16, 8)
        if not msg:
            os._exit(0)
        try:
            socket.send_fds(prepared, [msg], fd_list)
        except OSError as e:  # the prepared guard is gone (killed from outside): this job fails as a sandbox error
            fds = dict(zip(json.loads(msg)["fd_names"], fd_list))
            try:
                _status(fds["status"], {"guard_error": f"the prepared guard is gone: {type(e).__name__}: {e}"})
            except OSError:  # the grader stopped listening: nothing left to tell
                pass
        for fd in fd_list:
            os.close(fd)
        prepared.close()
        prepared = _prepare_guard(control, config)


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        zygote(int(sys.argv[2]), json.loads(sys.argv[3]))
    elif sys.argv[1] == "--once":
        once_request = json.loads(sys.argv[3])
        once_fds = dict(zip(once_request["fd_names"], once_request["fd_numbers"]))
        guard(json.loads(sys.argv[2]), lambda: (once_request, once_fds), keep=set(once_fds.values()), ahead=False)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --zygote FD CONFIG_JSON | --once CONFIG_JSON REQUEST_JSON")
