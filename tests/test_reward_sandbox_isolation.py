"""What the sandbox guarantees to one execution, observed from inside it (probe programs) and from outside.

The tests run in whichever isolation mode this host allows ("root" as root, "userns" without root). When none works
they skip, except under CI (CI=true), where the first test fails instead: a suite must not pass with no isolation
tested at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reward.sandbox import (PROTECTED_PATHS, Sandbox, SandboxLimits, SandboxRefused, SandboxUnavailable,
                            isolation_problems)

MISSING = isolation_problems()
needs_isolation = pytest.mark.skipif(bool(MISSING), reason="no isolation mode works here: " + "; ".join(MISSING))
CHECKOUT = str(Path(__file__).resolve().parent.parent)
SOURCE = str(Path(CHECKOUT) / "src")
UID_BASE = 7_000_000
LIMITS = SandboxLimits(cpu_s=1, wall_s=2, memory_bytes=512 << 20, nproc=4, stdout_cap=64 << 10)

PROBE = """
import ctypes, json, os, resource, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
caps = (ctypes.c_uint32 * 6)()
libc.capget((ctypes.c_uint32 * 2)(0x20080522, 0), caps)
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
facts = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
         "other_pids": [p for p in range(2, 3000) if alive(p)], "capabilities": list(caps),
         "no_new_privs": libc.prctl(39, 0, 0, 0, 0), "seccomp": libc.prctl(21, 0, 0, 0, 0),
         "cwd": os.getcwd(), "scratch": sorted(os.listdir('.')), "root": sorted(os.listdir('/')),
         "proc": os.path.exists('/proc/self'), "work_visible": os.path.exists('@CHECKOUT@'),
         "host_tmp_visible": os.path.exists('@HOST_FILE@'),
         "python_paths": sorted({p for p in sys.path + [sys.executable, sys.prefix] +
                                 [getattr(m, '__file__', None) or '' for m in list(sys.modules.values())] if p}),
         "site_packages": {d: os.listdir(d) for d in @SITE_DIRS@ if os.path.isdir(d)},
         "rlimits": {n: resource.getrlimit(getattr(resource, n))[0] for n in
                     ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_NPROC', 'RLIMIT_NOFILE', 'RLIMIT_CORE')}}
from sortedcontainers import SortedList
facts["sortedcontainers"] = list(SortedList([3, 1, 2]))
try:
    open('/packages/sortedcontainers/planted.py', 'w').close()
    facts["packages_writable"] = True
except OSError:
    facts["packages_writable"] = False
try:
    socket.create_connection(('127.0.0.1', @PORT@), timeout=1).close()
    facts["loopback_reached_host"] = True
except OSError as e:
    facts["loopback_reached_host"] = False
open('left_behind.txt', 'w').write('x')
print(json.dumps(facts))
"""

# System calls a graded program has no use for (x86_64 and aarch64 numbers), each with the arguments to try.
SYSCALLS = """
import ctypes, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L = ctypes.c_long
buf = ctypes.create_string_buffer(256)
x86 = os.uname().machine == "x86_64"
calls = {
    "add_key": (248 if x86 else 217, b"user", b"gq-probe", b"left behind", L(11), L(-4)),
    "keyctl": (250 if x86 else 219, L(0), L(-4), L(0)),
    "request_key": (249 if x86 else 218, b"user", b"gq-probe", None, L(0)),
    "ptrace": (101 if x86 else 117, L(0), L(0), L(0), L(0)),
    "mount": (165 if x86 else 40, b"none", b"/scratch", b"tmpfs", L(0), None),
    "unshare": (272 if x86 else 97, L(0x10000000)),
    "setns": (308 if x86 else 268, L(0), L(0)),
    "chroot": (161 if x86 else 51, b"/scratch"),
    "bpf": (321 if x86 else 280, L(0), buf, L(72)),
    "perf_event_open": (298 if x86 else 241, buf, L(0), L(-1), L(-1), L(0)),
    "userfaultfd": (323 if x86 else 282, L(1)),
    "process_vm_readv": (310 if x86 else 270, L(1), L(0), L(0), L(0), L(0), L(0)),
    "kcmp": (312 if x86 else 272, L(1), L(1), L(0), L(0), L(0)),
    "io_uring_setup": (425, L(4), buf),
    "open_tree": (428, L(-100), b"/", L(0)),
    "fsopen": (430, b"tmpfs", L(0)),
    "pidfd_getfd": (438, L(0), L(0), L(0)),
    "clone3": (435, buf, L(88)),
}
out = {}
for name, (nr, *args) in calls.items():
    ret = libc.syscall(L(nr), *args)
    out[name] = "ok" if ret >= 0 else os.strerror(ctypes.get_errno())
    if name == "clone3" and ret == 0:
        os._exit(0)
ret = libc.syscall(L(56 if x86 else 220), L(0x10000000 | 17), L(0), L(0), L(0), L(0))  # clone(CLONE_NEWUSER)
if ret == 0:
    os._exit(0)
out["clone(CLONE_NEWUSER)"] = "ok" if ret >= 0 else os.strerror(ctypes.get_errno())
threading.Thread(target=lambda: out.__setitem__("thread", "ran")).start()
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
out["subprocess"] = subprocess.run(["/bin/echo", "ran"], capture_output=True, text=True).stdout.strip()
out["uid"] = os.getuid()
print(json.dumps(out))
"""
DENIED = ("add_key", "keyctl", "request_key", "ptrace", "mount", "unshare", "setns", "chroot", "bpf",
          "perf_event_open", "userfaultfd", "process_vm_readv", "kcmp", "io_uring_setup", "open_tree", "fsopen",
          "pidfd_getfd", "clone(CLONE_NEWUSER)")


def _job(program: str) -> dict:
    return {"kind": "oracle", "program": program, "setup_code": "", "method": "f", "inputs": []}


def _facts(execution) -> dict:
    assert execution.exit_code == 0 and not execution.sandbox_error, (
        f"the probe should run: {execution.describe_end()} {execution.stderr[-2000:].decode()}")
    return json.loads(execution.stdout)


def _base_site_dirs() -> list[str]:
    """The base interpreter's site-packages directories (where a plain, non-venv install puts the package)."""
    return sorted({os.path.realpath(d) for d in site.getsitepackages([sys.base_prefix]) if os.path.isdir(d)})


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(LIMITS, uid_base=UID_BASE) as sb:
        yield sb


def test_an_isolation_mode_works_here_or_the_suite_fails_in_ci():
    if MISSING and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI is set but no isolation mode works on this host, so no isolation test would run: "
                    + "; ".join(MISSING))
    if MISSING:
        pytest.skip("no isolation mode works here: " + "; ".join(MISSING))
    with Sandbox(LIMITS) as sb:
        assert sb.isolation in ("root", "userns"), "auto never picks the unisolated mode"


@needs_isolation
def test_execution_runs_unprivileged_in_its_own_namespaces_and_sees_only_its_scratch(sandbox, tmp_path):
    host_file = tmp_path / "host_only.txt"
    host_file.write_text("host")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    site_dirs = [f"/python/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages", *_base_site_dirs()]
    program = (PROBE.replace("@HOST_FILE@", str(host_file)).replace("@PORT@", str(listener.getsockname()[1]))
               .replace("@CHECKOUT@", CHECKOUT).replace("@SITE_DIRS@", repr(site_dirs)))
    first, second = sandbox.run(_job(program)), sandbox.run(_job(program))
    listener.close()
    f1, f2 = _facts(first), _facts(second)
    assert f1["uid"] == f1["euid"] == f1["gid"] != 0, f"should run as an unprivileged uid: {f1}"
    if sandbox.isolation == "root":
        assert f1["uid"] >= UID_BASE and f1["groups"] == [], f"root mode: a uid of its own, no groups: {f1}"
        assert f1["uid"] != f2["uid"], "two executions should not need to share a uid"
    assert f1["capabilities"] == [0] * 6, f"no capability of any kind: {f1['capabilities']}"
    assert f1["no_new_privs"] == 1 and f1["seccomp"] == 2, "no_new_privs set, a seccomp filter installed"
    assert f1["pid"] == 1 and f1["other_pids"] == [], f"own pid namespace, nothing else alive: {f1['other_pids']}"
    assert f1["cwd"] == "/scratch" and f1["scratch"] == [] and f2["scratch"] == [], (
        "each execution starts in an empty private scratch dir (a file left by the first is not seen by the second)")
    assert not f1["work_visible"] and not f1["host_tmp_visible"] and not f1["proc"], (
        "the checkout, the host's /tmp and /proc must be invisible")
    assert set(f1["root"]) <= {"usr", "bin", "lib", "lib64", "lib32", "libx32", "sbin", "etc", "dev", "scratch", "tmp",
                               "python", "packages", "sandbox"}, f"unexpected sandbox root entries: {f1['root']}"
    inside = ("/python", "/packages", "/sandbox", "/usr")
    host_paths = [p for p in f1["python_paths"] if not any(p == d or p.startswith(d + "/") for d in inside)]
    assert not host_paths, f"the interpreter's state should name no host path: {host_paths}"
    assert all(entries == [] for entries in f1["site_packages"].values()), (
        f"the interpreter's site-packages must look empty inside: {f1['site_packages']}")
    assert f1["sortedcontainers"] == [1, 2, 3] and f1["packages_writable"] is False, (
        "the vendored packages are importable and read-only")
    assert f1["loopback_reached_host"] is False, "the network namespace should not reach the host's loopback"
    assert f1["rlimits"] == {"RLIMIT_CPU": LIMITS.cpu_s, "RLIMIT_AS": LIMITS.memory_bytes,
                             "RLIMIT_FSIZE": LIMITS.fsize_bytes,
                             "RLIMIT_NPROC": LIMITS.nproc + (sandbox.isolation == "userns"),  # the guard counts
                             "RLIMIT_NOFILE": LIMITS.nofile, "RLIMIT_CORE": 0}
    assert not (tmp_path / "left_behind.txt").exists()


def _key_users() -> dict[int, str]:
    with open("/proc/key-users") as f:
        return {int(line.split(":")[0]): line.strip() for line in f}


@needs_isolation
def test_system_calls_a_program_has_no_use_for_fail_and_no_key_outlives_the_execution(sandbox):
    out = _facts(sandbox.run(_job(SYSCALLS)))
    allowed = {name: out[name] for name in DENIED if out[name] != "Operation not permitted"}
    assert not allowed, f"these should fail with EPERM: {allowed}"
    assert out["clone3"] == "Function not implemented", "clone3 is refused with ENOSYS, so libc falls back to clone"
    assert (out["thread"], out["fork"], out["subprocess"]) == ("ran", 7, "ran"), f"threads, fork, exec work: {out}"
    if sandbox.isolation == "root":  # a key left in the uid's keyring would reach a later execution of that uid
        assert out["uid"] not in _key_users(), f"the execution's uid holds keys: {_key_users().get(out['uid'])}"


@needs_isolation
def test_process_limit_holds_for_the_unprivileged_uid(sandbox):
    program = ("import os, time\nmade = 0\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n"
               "            time.sleep(5)\n            os._exit(0)\n        made += 1\n    except OSError:\n"
               "        break\nprint(made)\n")
    execution = sandbox.run(_job(program))
    assert int(execution.stdout) == LIMITS.nproc - 1, (
        f"RLIMIT_NPROC={LIMITS.nproc} should stop forking after {LIMITS.nproc - 1} children: {execution}")
    assert not execution.timed_out, "the sleeping children die with the namespace's init; nothing waits for them"


@needs_isolation
def test_cpu_and_wall_limits_kill_and_report(sandbox):
    spin, sleep = sandbox.run(_job("while True:\n    pass\n")), sandbox.run(_job("import time\ntime.sleep(60)\n"))
    assert spin.signal in (signal.SIGXCPU, signal.SIGKILL) or spin.timed_out, f"a spin must be killed: {spin}"
    assert sleep.timed_out and "wall-clock" in sleep.describe_end(), f"a sleeper is killed at the wall clock: {sleep}"


@needs_isolation
def test_output_past_its_cap_is_cut_and_reported(sandbox):
    execution = sandbox.run(_job("import sys\nwhile True:\n    sys.stdout.write('A' * 4096)\n"))
    assert "stdout" in execution.overflow and len(execution.stdout) == LIMITS.stdout_cap
    assert not execution.timed_out, "closing the stream at its cap ends the writer quickly (EPIPE)"


@needs_isolation
def test_zygote_and_fresh_interpreter_launchers_give_the_same_records():
    job = {"kind": "oracle", "program": "class Solution:\n    def f(self, a):\n        return [a, (a,), {a: str(a)}]\n",
           "setup_code": "from typing import *\n", "method": "f",
           "inputs": [compile(f"dict({source})", "<input>", "eval") for source in ("a = 1", "a = 2")]}
    with Sandbox(LIMITS, launcher="zygote") as zygote, Sandbox(LIMITS, launcher="spawn") as spawn:
        a, b = zygote.run(job), spawn.run(job)
    assert a.records == b.records and a.exit_code == b.exit_code == 0, f"{a} vs {b}"


@needs_isolation
def test_a_protected_path_in_a_bound_directory_refuses_to_start_unless_it_is_hidden():
    for launcher in ("zygote", "spawn"):
        with pytest.raises(SandboxRefused, match=r"/usr/share would be readable inside the sandbox at /usr/share: "
                                                 r"it lies in /usr, which the sandbox binds read-only"):
            Sandbox(LIMITS, launcher=launcher, protected_paths=("/usr/share",))
    # a plain (non-venv) install puts the package, data included, in the base interpreter's site-packages: those
    # directories are covered by an empty tmpfs inside, so the sandbox starts and the data stays unseen
    hidden = _base_site_dirs()
    assert hidden, "the base interpreter should have a site-packages directory"
    with Sandbox(LIMITS, protected_paths=tuple(hidden)) as sb:
        assert sb.run(_job("print('ok')\n")).stdout == b"ok\n"
    assert all(os.path.exists(p) for p in PROTECTED_PATHS), "the package's own data is protected by default"


def test_unisolated_is_an_explicit_opt_in_that_still_grades(caplog, monkeypatch):
    monkeypatch.delenv("GQ_SANDBOX_ISOLATION", raising=False)
    with pytest.raises(ValueError, match="isolation must be one of"):
        Sandbox(LIMITS, isolation="none")
    monkeypatch.setenv("GQ_SANDBOX_ISOLATION", "unisolated")
    with caplog.at_level(logging.WARNING, logger="reward.sandbox"), Sandbox(LIMITS) as sb:
        assert sb.isolation == "unisolated" and "UNISOLATED" in caplog.text
        program = "import os, json\nopen('f', 'w').write('x')\nprint(json.dumps([os.getuid(), os.getcwd()]))\n"
        out = sb.run(_job(program))
        uid, cwd = json.loads(out.stdout)
        assert uid == os.getuid() and not os.path.exists(cwd), "runs as this user, in a temporary dir removed after"
        from reward.grader import grade
        from reward.problem import Problem, TestCase

        problem = Problem(problem_id="add-one", source="synthetic", difficulty="Easy", description="add one",
                          starter_code="class Solution:\n    def f(self, a):\n        ", method_name="f",
                          setup_code="", tests=(TestCase("a = 1", "2"),))
        verdict = grade(problem, "```python\nclass Solution:\n    def f(self, a):\n        return a + 1\n```",
                        "sentinel", sandbox=sb)
        assert verdict.solve == 1, verdict.reason


def test_a_mode_that_cannot_work_raises_one_error_naming_what_it_lacks():
    host_root = open("/proc/self/uid_map").read().split() == ["0", "0", "4294967295"] and os.geteuid() == 0
    if os.geteuid() == 0 and not host_root:
        pytest.skip("root inside a container's user namespace: either mode may work here")
    with pytest.raises(SandboxUnavailable) as error:
        Sandbox(LIMITS, isolation="userns" if host_root else "root")
    text = str(error.value)
    assert "cannot isolate untrusted code on this host" in text and "isolation='unisolated'" in text, text
    assert ("running as root: root mode applies" if host_root else f"not root (euid {os.geteuid()})") in text, text


# Run as an unprivileged user (uid 65534) with the interpreter that user can run: the userns mode end to end.
UNPRIVILEGED_DRIVER = r'''
import json, sys
from reward.grader import grade
from reward.problem import Problem, TestCase
from reward.sandbox import Sandbox, SandboxLimits
problem = Problem(problem_id="add-one", source="synthetic", difficulty="Easy", description="add one",
                  starter_code="class Solution:\n    def f(self, a):\n        ", method_name="f", setup_code="",
                  tests=(TestCase("a = 1", "2"),))
job = lambda program: {"kind": "oracle", "program": program, "setup_code": "", "method": "f", "inputs": []}
with Sandbox(SandboxLimits(cpu_s=1, wall_s=2, nproc=4)) as sb:
    probe = sb.run(job(sys.argv[1]))
    forks = sb.run(job("import os, time\nmade = 0\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n"
                       "            time.sleep(5)\n            os._exit(0)\n        made += 1\n    except OSError:\n"
                       "        break\nprint(made)\n"))
    solved = grade(problem, "```python\nclass Solution:\n    def f(self, a):\n        return a + 1\n```", "run_tests",
                   sandbox=sb)
    print(json.dumps({"isolation": sb.isolation, "probe": probe.stdout.decode(), "stderr": probe.stderr.decode(),
                      "forks": forks.stdout.decode(), "solve": solved.solve}))
'''


def _unprivileged_python() -> str | None:
    for python in (os.path.realpath(sys._base_executable), shutil.which("python3"), "/usr/bin/python3"):
        try:
            if python and subprocess.run([python, "-c", "import json"], user=65534, group=65534, cwd="/",
                                         capture_output=True).returncode == 0:
                return python
        except OSError:  # not even executable by that user
            continue
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged uid needs root")
def test_userns_mode_isolates_an_unprivileged_user():
    python = _unprivileged_python()
    readable = python and subprocess.run([python, "-c", "import reward.sandbox"], user=65534, group=65534, cwd="/",
                                         env={"PYTHONPATH": SOURCE}, capture_output=True).returncode == 0
    if not readable:
        pytest.skip("no interpreter and checkout that uid 65534 can read on this host")
    site_dirs = ["/python/lib", "/usr/lib/python3/dist-packages"]
    probe = PROBE.replace("@HOST_FILE@", "/etc/hostname-none").replace("@PORT@", "9").replace(
        "@CHECKOUT@", CHECKOUT).replace("@SITE_DIRS@", repr(site_dirs))
    done = subprocess.run([python, "-c", UNPRIVILEGED_DRIVER, probe], user=65534, group=65534, cwd="/",
                          env={"PYTHONPATH": SOURCE, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)
    if "user namespaces" in done.stderr or "CLONE_NEWUSER" in done.stderr:
        pytest.skip("this kernel does not let an unprivileged user create user namespaces: " + done.stderr[-300:])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    facts = json.loads(out["probe"])
    assert out["isolation"] == "userns" and out["solve"] == 1, out
    assert facts["capabilities"] == [0] * 6 and facts["seccomp"] == 2 and facts["pid"] == 1, facts
    assert not facts["work_visible"] and not facts["proc"] and facts["other_pids"] == [], facts
    assert int(out["forks"]) == 3, f"RLIMIT_NPROC counts this execution's processes alone: {out['forks']}"
