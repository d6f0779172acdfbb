"""Trusted process side of the sandbox: the zygote, the guard and the payload set-up. Runs in a FRESH interpreter.

Never imported by the grader process: `reward.sandbox` starts `python -I -S _zygote.py ...`, so this process holds
nothing of the grader's memory (no expected values, no other samples).

Start-up, once per zygote (`enter`, isolating modes only):
  - "root": a private mount namespace; "userns": a new user namespace (the grader's own uid is root inside it, with
    capabilities over its namespaces only) and a private mount namespace;
  - a new root: a read-only tmpfs holding read-only binds of the system directories, of the interpreter's prefix at
    /python (unless it lies in them) and of the sandbox's packages at /packages; each site-packages directory of the
    interpreter covered by an empty read-only tmpfs; copies of the trusted scripts at /sandbox; four device nodes;
    a mount point /scratch (and /tmp linking to it); no /proc;
  - pivot_root into it and detach the old root, then exec the interpreter from inside. From then on the zygote and
    everything it forks see no host path: not in a mount table, nor in sys.path, sys.argv or any module's file name.
It refuses (reporting why on the control socket) when a protected path (the package's own data) would be visible.

Roles, one execution:
  zygote (long-lived, pre-warmed)  keeps one guard prepared ahead of the next job; hands each control message and
                                    the job's pipe fds (SCM_RIGHTS) to that guard, then prepares the next
    guard (trusted)                 new pid/mount/net/ipc/uts namespaces ("userns": and a user namespace of its own),
                                    a size-capped tmpfs at /scratch, forks the payload, all BEFORE its job exists;
                                    then passes the job's fds to the payload, enforces the wall clock, reports exit
                                    status and collected scratch files on the status pipe
      payload (pid 1 of its ns)     setsid, rlimits, no_new_privs, drops to its execution's uid ("root": a uid of its
                                    own; "userns": all capabilities dropped), installs the seccomp filter
                                    (`_seccomp`), warms up (`_harness.warm_up`), then waits for its job's fds; reads
                                    its job from the memfd and runs `_harness.run_job`

Preparing the guard ahead moves the forks, namespaces and mounts off the job's critical path; it changes nothing a
payload can observe: each guard and payload serves exactly one job, and both are forked from the zygote, which never
holds job data. When the payload (its namespace's init) dies, the kernel kills every process of the namespace: no
stray process can outlive an execution. `--once` enters and runs one guard with its job at once (the
fresh-interpreter-per-execution baseline). "unisolated" (an explicit opt-in) skips the namespaces, the new root and
the uid switch: the program runs as the grader's uid in a temporary directory, with the rlimits and the filter only.
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
import shutil
import signal
import socket
import stat
import sys
import tempfile
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (pre-warms the modules every problem's setup code imports)
import _seccomp  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Where the zygote builds the new root before pivoting into it (in its private mount namespace: the host never sees
# it). The sources are opened first, so a checkout or prefix under /tmp is still reachable.
NEW_ROOT = "/tmp"
READONLY_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin", "/etc")
PYTHON_MOUNT = "/python"  # the interpreter's prefix, when it lies outside READONLY_DIRS
PACKAGES_MOUNT = "/packages"  # the sandbox's third-party packages (Sandbox config "packages_dir")
SCRIPTS_MOUNT = "/sandbox"  # copies of the trusted scripts the zygote runs from inside
TRUSTED_SCRIPTS = ("_zygote.py", "_harness.py", "_canonical.py", "_seccomp.py")
SCRATCH = "/scratch"
DEVICES = ("null", "zero", "urandom", "random")
USERNS_UID = 1000  # "userns": the uid inside an execution's user namespace (the grader's uid outside)
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


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(flags), f"unshare({what})")


def _write_id_maps(proc_fd: int, inside: int, outside: int) -> None:
    """Map one uid and gid of this process's new user namespace (setgroups denied first, as the kernel requires of
    an unprivileged writer). `proc_fd`: the host's /proc, opened before the zygote left it."""
    maps = (("setgroups", "deny"), ("uid_map", f"{inside} {outside} 1"), ("gid_map", f"{inside} {outside} 1"))
    for name, text in maps:
        fd = os.open(f"self/{name}", os.O_WRONLY, dir_fd=proc_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


# ---- start-up: the new root, once per zygote ----

class Refused(RuntimeError):
    """The sandbox would show a protected path (reported to the grader as "refused: ...", which does not fall back
    to another isolation mode)."""


def _failure(e: BaseException) -> str:
    return f"refused: {e}" if isinstance(e, Refused) else f"error: {type(e).__name__}: {e}"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def layout(config: dict) -> tuple[dict[str, str], list[str], str]:
    """(host dir -> where it appears inside, host dirs covered by an empty tmpfs, the interpreter's path inside)."""
    binds = {d: d for d in READONLY_DIRS if os.path.isdir(d) and not os.path.islink(d)}
    prefix, executable = os.path.realpath(sys.prefix), os.path.realpath(sys.executable)
    exec_prefix = os.path.realpath(sys.exec_prefix)
    if any(_under(prefix, d) for d in binds):
        inside_executable = executable
    else:
        if not _under(executable, prefix) or exec_prefix != prefix:
            raise RuntimeError(f"the interpreter {executable} is not inside its prefix {prefix} (exec prefix "
                               f"{exec_prefix}): the sandbox cannot show it at {PYTHON_MOUNT}")
        binds[prefix] = PYTHON_MOUNT
        inside_executable = PYTHON_MOUNT + executable[len(prefix):]
    binds[os.path.realpath(config["packages_dir"])] = PACKAGES_MOUNT
    import site  # not run at start-up (-S): its functions only
    import sysconfig

    candidates = site.getsitepackages() + [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    masks = sorted({os.path.realpath(d) for d in candidates if os.path.isdir(d)})
    masks = [m for m in masks if any(_under(m, host) for host in binds)]
    return binds, masks, inside_executable


def _inside(path: str, binds: dict[str, str]) -> str:
    host = max((h for h in binds if _under(path, h)), key=len)
    return binds[host] + path[len(host):]


def protected_problems(binds: dict[str, str], masks: list[str], protected: list[str]) -> list[str]:
    """Each protected path (the package's data) that would be readable inside, and why."""
    problems = []
    for path in (os.path.realpath(p) for p in protected):
        for host, inside in binds.items():
            if _under(path, host) and not any(_under(path, m) for m in masks):
                problems.append(f"{path} would be readable inside the sandbox at {_inside(path, binds)}: it lies in "
                                f"{host}, which the sandbox binds read-only")
            elif _under(host, path):
                problems.append(f"{host}, which the sandbox binds read-only at {inside}, lies inside {path}")
    return problems


def _readonly(target: str) -> None:
    """Make the mount at `target` and every mount below it read-only, nosuid, nodev."""
    attr = (ctypes.c_uint64 * 4)(MS_RDONLY | MS_NOSUID | MS_NODEV, 0, 0, 0)  # MOUNT_ATTR_* share these bits
    at_fdcwd, at_recursive = -100, 0x8000
    ret = _libc.syscall(ctypes.c_long(_seccomp.number("mount_setattr")), ctypes.c_long(at_fdcwd), target.encode(),
                        ctypes.c_uint(at_recursive), attr, ctypes.c_size_t(ctypes.sizeof(attr)))
    if ret == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: before Linux 5.12, remount the top mount, keeping its locked flags
        _check(-1, f"mount_setattr {target}")
    flags = os.statvfs(target).f_flag
    kept = ((MS_NOEXEC if flags & os.ST_NOEXEC else 0) | (MS_NOATIME if flags & os.ST_NOATIME else 0)
            | (MS_NODIRATIME if flags & os.ST_NODIRATIME else 0) | (MS_RELATIME if flags & os.ST_RELATIME else 0))
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _build_root(config: dict) -> str:
    """Build the new root at NEW_ROOT (see the module docstring); return the interpreter's path inside it."""
    binds, masks, inside_executable = layout(config)
    problems = protected_problems(binds, masks, config["protected"])
    if problems:
        raise Refused("; ".join(problems))
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # first: nothing below may propagate to the host
    # opened before the new root's tmpfs covers NEW_ROOT, under which a source may lie (a checkout in /tmp)
    sources = {host: os.open(host, os.O_PATH | os.O_DIRECTORY) for host in binds}
    here = os.path.dirname(os.path.abspath(__file__))
    scripts = {name: open(os.path.join(here, name), "rb").read() for name in TRUSTED_SCRIPTS}
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=2m,mode=0755")
    for path in READONLY_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), NEW_ROOT + path)
    for host, inside in sorted(binds.items(), key=lambda item: item[1]):
        os.makedirs(NEW_ROOT + inside, exist_ok=True)
        _mount(f"/proc/self/fd/{sources[host]}", NEW_ROOT + inside, None, MS_BIND | MS_REC)
        os.close(sources[host])
        _readonly(NEW_ROOT + inside)
    for host in masks:
        _mount("tmpfs", NEW_ROOT + _inside(host, binds), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=4k,nr_inodes=2,mode=0555")
    os.makedirs(NEW_ROOT + SCRIPTS_MOUNT)
    for name, content in scripts.items():
        with open(f"{NEW_ROOT}{SCRIPTS_MOUNT}/{name}", "wb") as f:
            f.write(content)
    os.makedirs(NEW_ROOT + "/dev")
    for dev in DEVICES:
        open(f"{NEW_ROOT}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{NEW_ROOT}/dev/{dev}", None, MS_BIND)
    os.makedirs(NEW_ROOT + SCRATCH)
    os.symlink(SCRATCH, NEW_ROOT + "/tmp")
    os.chdir(NEW_ROOT)
    _check(_libc.syscall(ctypes.c_long(_seccomp.number("pivot_root")), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return inside_executable


def enter(config: dict, keep: list[int]) -> tuple[str, dict]:
    """Isolate this fresh interpreter (see the module docstring) and return (the interpreter's path inside, the
    config the process exec'd inside will read). Only the fds in `keep` (made inheritable) cross the exec."""
    isolation = config["isolation"]
    inside = {key: value for key, value in config.items() if key not in ("packages_dir", "protected")}
    if isolation == "userns":
        euid, egid = os.geteuid(), os.getegid()
        proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY)  # per-execution id maps (guards write them)
        _unshare(CLONE_NEWUSER | CLONE_NEWNS, "CLONE_NEWUSER | CLONE_NEWNS")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {euid} 1"), ("gid_map", f"0 {egid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        keep.append(proc_fd)
        inside["proc_fd"] = proc_fd
    elif isolation == "root":
        _unshare(CLONE_NEWNS, "CLONE_NEWNS")
    else:
        raise ValueError(f"not an isolating mode: {isolation!r}")
    executable = _build_root(config)
    for fd in keep:
        os.set_inheritable(fd, True)
    return executable, inside


def _exec_inside(executable: str, args: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    if executable.startswith(PYTHON_MOUNT + "/"):  # a prefix whose libraries the loader would seek at its host path
        env["LD_LIBRARY_PATH"] = PYTHON_MOUNT + "/lib"
    os.execve(executable, [executable, "-I", "-S", f"{SCRIPTS_MOUNT}/_zygote.py", *args], env)


# ---- one execution ----

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


def _drop_capabilities() -> None:
    """"userns": the payload keeps no capability, not even over its own namespaces (nor any to regain by exec)."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0 and ctypes.get_errno() == 22:
            break  # EINVAL: past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(header, data), "capset")


def _payload(config: dict, uid: int, scratch: str, channel: socket.socket, ahead: bool) -> None:
    """Pid 1 of the new pid namespace (in "unisolated": a process of its own session): drop privileges and confine
    itself, then wait on `channel` for the job's fds and run the job. Never returns. The isolation is set up before
    the job exists, so a set-up failure is kept and reported on the job's stderr once that arrives. `ahead`:
    prepared ahead of its job, so warm up while waiting."""
    limits, isolation = config["limits"], config["isolation"]
    setup_error = ""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_fds_except({channel.fileno()})  # nothing of the guard's or the zygote's stays open here
        os.chdir(scratch)
        sys.path.append(config["packages_dir"] if isolation == "unisolated" else PACKAGES_MOUNT)
        # a session of its own, as each `--once` execution has: no tie to the zygote's process group, and (with
        # sched autogroup) a CPU share of its own instead of one shared by every execution the zygote runs
        os.setsid()
        cpu = int(limits["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize_bytes"], limits["fsize_bytes"]))
        # counted per uid ("userns": per uid and user namespace, where the guard counts too); unisolated, the uid
        # is the grader's own: no process limit
        if isolation != "unisolated":
            nproc = limits["nproc"] + (isolation == "userns")
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if isolation == "root":
            os.setgroups([])
        if isolation != "unisolated":
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        if isolation == "userns":
            _drop_capabilities()
        if not (isolation == "unisolated" and _seccomp.supported()):  # unisolated runs where no filter exists
            _seccomp.install()
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
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch})
    except BaseException as e:
        _setup_failed(2, f"{type(e).__name__}: {e}")
    try:
        _harness.run_job(job, RESULT_FD)  # exits the process itself
    finally:
        os._exit(1)  # never fall back into the guard's or the zygote's code


def _status(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def _collect(scratch: str, names: list[str]) -> dict[str, str]:
    """Read (capped, regular files only, no symlinks) the named files the payload left in its scratch dir."""
    files = {}
    for name in names:
        try:
            fd = os.open(f"{scratch}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                files[name] = base64.b64encode(os.read(fd, FILE_COLLECT_CAP)).decode()
        finally:
            os.close(fd)
    return files


def _new_execution(config: dict) -> tuple[int, str]:
    """The guard's namespaces and scratch dir for one execution; returns (the payload's uid, its scratch dir)."""
    isolation, limits = config["isolation"], config["limits"]
    if isolation == "unisolated":
        return os.getuid(), tempfile.mkdtemp(prefix="gq-scratch-")
    namespaces = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if isolation == "userns":
        # a user namespace per execution: RLIMIT_NPROC counts its processes apart from every other execution's
        _unshare(CLONE_NEWUSER | namespaces, "CLONE_NEWUSER | NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS")
        _write_id_maps(config["proc_fd"], USERNS_UID, 0)
        uid = USERNS_UID
    else:
        # uid = uid_base + the guard's pid: distinct for every live execution, so RLIMIT_NPROC (counted per uid) of
        # one sample cannot starve another, and no sandbox uid owns any file of the host.
        _unshare(namespaces, "CLONE_NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS")
        uid = config["uid_base"] + os.getpid()
    _mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={limits['scratch_bytes']},nr_inodes={limits['scratch_inodes']},mode=0700,uid={uid},gid={uid}")
    return uid, SCRATCH


def guard(config: dict, receive: Callable[[], tuple[dict, dict[str, int]]], keep: set[int], ahead: bool) -> None:
    """Prepare one execution (namespaces, scratch, a waiting payload), then take its job from `receive()`, run it and
    report on the job's status fd. Never returns. `keep`: the fds to keep open (all others are closed first).
    `ahead`: prepared ahead of the job (the zygote's guards), rather than given it at once (`--once`)."""
    limits, isolation = config["limits"], config["isolation"]
    setup_error, scratch = "", ""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _close_fds_except(keep | ({config["proc_fd"]} if "proc_fd" in config else set()))
        uid, scratch = _new_execution(config)
        to_payload, payload_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            to_payload.close()
            _payload(config, uid, scratch, payload_end, ahead)
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
        if isolation == "unisolated":  # no pid namespace: what is left of the payload's process group goes now
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        record = {
            "exit_code": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
            "signal": os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None,
            "timed_out": timed_out,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "files": _collect(scratch, request["collect"]),
        }
    except BaseException as e:
        record = {"guard_error": f"{type(e).__name__}: {e}"}
    if isolation == "unisolated" and scratch:  # elsewhere the scratch tmpfs vanishes with the mount namespace
        shutil.rmtree(scratch, ignore_errors=True)
    _status(status_fd, record)
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


def zygote(control: socket.socket, config: dict) -> None:
    """Tell the grader it is ready; then hand each control message and its fds to the prepared guard, close them
    here, prepare the next guard.

    Exits when the grader closes (or dies, closing) the control socket; the prepared guard then sees its socket
    close and exits too. Not PR_SET_PDEATHSIG: that fires when the grader THREAD that started the zygote exits,
    e.g. a pool worker."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # guards are reaped by the kernel
    control.send(b"ready")
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


def _main(argv: list[str]) -> None:
    """--zygote FD CONFIG | --once CONFIG REQUEST, started by the grader at host paths; --inside-zygote FD CONFIG |
    --inside-once CONFIG REQUEST, the same after `enter` and the exec from inside the new root."""
    role, args = argv[1], argv[2:]
    if role in ("--zygote", "--inside-zygote"):
        control, config = socket.socket(fileno=int(args[0])), json.loads(args[1])
        if role == "--zygote" and config["isolation"] != "unisolated":
            try:
                executable, inside = enter(config, keep=[control.fileno()])
                _exec_inside(executable, ["--inside-zygote", args[0], json.dumps(inside)])
            except BaseException as e:
                control.send(_failure(e).encode())
                os._exit(1)
        zygote(control, config)
    elif role in ("--once", "--inside-once"):
        config, request = json.loads(args[0]), json.loads(args[1])
        fds = dict(zip(request["fd_names"], request["fd_numbers"]))
        if role == "--once" and config["isolation"] != "unisolated":
            try:
                executable, inside = enter(config, keep=list(fds.values()))
                _exec_inside(executable, ["--inside-once", json.dumps(inside), args[1]])
            except BaseException as e:
                _status(fds["status"], {"guard_error": _failure(e)})
                os._exit(1)
        guard(config, lambda: (request, fds), keep=set(fds.values()), ahead=False)
    else:
        raise SystemExit(f"usage: {argv[0]} --zygote FD CONFIG_JSON | --once CONFIG_JSON REQUEST_JSON")


if __name__ == "__main__":
    _main(sys.argv)
