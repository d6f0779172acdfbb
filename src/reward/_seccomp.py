"""The payload's seccomp filter: system calls a graded program has no use for fail with EPERM.

A classic BPF program built here and installed with prctl(PR_SET_SECCOMP) through ctypes, so the trusted side of the
sandbox needs nothing beyond the standard library (it runs the base interpreter with -I -S; the libseccomp Python
bindings are not on PyPI for every interpreter, and the filter is a page of code). Denied:

- state that outlives the execution or is shared across uids: the kernel keyrings (add_key, request_key, keyctl);
- reaching other processes: ptrace, process_vm_readv/writev, kcmp, pidfd_getfd, process_madvise;
- namespaces and mounts: unshare, setns, clone with a CLONE_NEW* flag, mount and the new mount API, pivot_root, chroot;
- large kernel attack surface: bpf, perf_event_open, userfaultfd, io_uring, fanotify, file handles;
- administration: modules, kexec, reboot, swap, accounting, quotas, the clocks, syslog, host and domain names.

clone3 fails with ENOSYS instead (its flags sit in memory a filter cannot read), so the C library falls back to
clone, whose flags it can check; fork, threads and subprocesses keep working. A call from another architecture's
ABI (the x32 ABI, or a 32-bit call where the table is 64-bit) kills the process: its numbers mean other calls.
"""

from __future__ import annotations

import ctypes
import errno
import os

# (AUDIT_ARCH value, {name: number}); the numbers from 424 on are the same on every architecture.
_COMMON_NEW = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
               "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
               "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443}
_TABLES = {
    "x86_64": (0xC000003E, {
        "ptrace": 101, "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153, "modify_ldt": 154,
        "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164,
        "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175,
        "delete_module": 176, "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180,
        "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
        "keyctl": 250, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323, **_COMMON_NEW}, {"clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {
        "lookup_dcookie": 18, "umount2": 39, "mount": 40, "pivot_root": 41, "nfsservctl": 42, "chroot": 51,
        "vhangup": 58, "quotactl": 60, "acct": 89, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142, "sethostname": 161,
        "setdomainname": 162, "settimeofday": 170, "adjtimex": 171, "add_key": 217, "request_key": 218,
        "keyctl": 219, "swapon": 224, "swapoff": 225, "perf_event_open": 241, "fanotify_init": 262,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273, "bpf": 280,
        "userfaultfd": 282, "kexec_file_load": 294, **_COMMON_NEW}, {"clone": 220, "clone3": 435}),
}
X32_SYSCALL_BIT = 0x40000000
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (CLONE_NEWTIME is a clone3/unshare flag only)
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# classic BPF
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (little-endian: the low half of args[0] first)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def number(name: str) -> int:
    """This architecture's number of a system call of the tables above (pivot_root, mount_setattr: no libc wrapper)."""
    return _TABLES[os.uname().machine][1][name]


def supported() -> str:
    """"" when this machine's architecture has a filter here, else why not."""
    machine = os.uname().machine
    return "" if machine in _TABLES else f"no seccomp filter for the {machine} architecture (x86_64, aarch64 only)"


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions."""
    machine = machine or os.uname().machine
    arch, denied, clones = _TABLES[machine]
    numbers = sorted(set(denied.values()))
    head = [(_LD_W_ABS, 0, 0, _ARCH), (_JEQ_K, 1, 0, arch), (_RET_K, 0, 0, _RET_KILL_PROCESS), (_LD_W_ABS, 0, 0, _NR)]
    if machine == "x86_64":
        head += [(_JGE_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, _RET_KILL_PROCESS)]
    # then one test per denied number, jumping past the other tests and the allow to EPERM; clone3 to ENOSYS; clone
    # to the check of its flags (a jump skips `jt` instructions)
    n = len(numbers)
    tests = [(_JEQ_K, n + 2 - k, 0, nr) for k, nr in enumerate(numbers)]
    tests += [(_JEQ_K, 3, 0, clones["clone3"]), (_JEQ_K, 3, 0, clones["clone"])]
    tail = [(_RET_K, 0, 0, _RET_ALLOW),
            (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
            (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
            (_LD_W_ABS, 0, 0, _ARG0_LOW), (_JSET_K, 0, 1, CLONE_NEW_FLAGS),
            (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM), (_RET_K, 0, 0, _RET_ALLOW)]
    return head + tests + tail


def install() -> None:
    """Install the filter on this process (and every process it starts). Needs no_new_privs (or CAP_SYS_ADMIN)."""
    instructions = program()
    filters = (_SockFilter * len(instructions))(*[_SockFilter(*ins) for ins in instructions])
    fprog = _SockFprog(len(instructions), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter: {os.strerror(err)}")
