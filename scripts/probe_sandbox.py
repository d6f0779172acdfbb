"""Attack probes against the grader's sandbox, with figures (Linux x86_64, run as the user the grader runs as).

    python scripts/probe_sandbox.py [--only channel,keyring,syscalls,paths] [--json OUT]

- channel: what one hostile sample costs the GRADING process (its own CPU, not the sandbox's, and how far its
  peak resident memory rises) when the program floods the result channel. Each attack is graded (oracle + the
  run_tests channel, as `grade` does) in a fresh process, after a warm-up sample, so the figures are its own.
- keyring: an execution adds a key to its uid's user keyring; afterwards, is the key still there (/proc/key-users)
  and can another process of the same uid read it (a later execution that gets the same uid)? Needs root.
- syscalls: the errno each of a list of system calls a graded program has no use for returns inside the sandbox.
- paths: which host paths a program can learn (mount table, /proc, sys.path and other interpreter state) and
  whether the base interpreter's site-packages can be listed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20

# ---- result channel attacks: each writes to fd 3 (the result channel) before the tests run ----
CHANNEL_ATTACKS = {
    "benign (a correct solution)": "",
    "one 31 MiB JSON record": ("import os\nb = b'{\"i\": 0, \"v\": [' + b'[],' * (31 * 2**20 // 3) + b'[]]}\\n'\n"
                               "while b:\n    b = b[os.write(3, b):]\n"),
    "32 MiB, no newline": "import os\nb = b'A' * (32 << 20)\nwhile b:\n    b = b[os.write(3, b):]\n",
    "10M empty records": "import os\nb = b'{}\\n' * (10 << 20)\nwhile b:\n    b = b[os.write(3, b):]\n",
    "256 KiB record of []": ("import os\nb = b'{\"i\": 0, \"v\": [' + b'[],' * ((2**18 - 64) // 3) + b'[]]}\\n'\n"
                             "while b:\n    b = b[os.write(3, b):]\n"),
    "1M-deep nesting": ("import os\nb = b'{\"i\": 0, \"v\": ' + b'[' * 10**6 + b']' * 10**6 + b'}\\n'\n"
                        "while b:\n    b = b[os.write(3, b):]\n"),
}

CHANNEL_CHILD = r'''
import json, os, resource, sys, time
from reward.grader import grade
from reward.problem import Problem, TestCase
from reward.sandbox import Sandbox

attack = sys.argv[1]
problem = Problem(problem_id="probe", source="synthetic", difficulty="Easy", description="add one",
                  starter_code="class Solution:\n    def f(self, a):\n        ", method_name="f",
                  setup_code="from typing import *\n", tests=tuple(TestCase(f"a = {a}", str(a + 1)) for a in range(3)))
solution = "class Solution:\n    def f(self, a):\n        return a + 1\n"
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
with Sandbox() as sandbox:
    grade(problem, f"```python\n{solution}```", "run_tests", sandbox=sandbox)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS restarts from the current RSS
    rss0, cpu0, t0 = status("VmRSS:"), cpu(), time.time()
    verdict = grade(problem, f"```python\n{attack}{solution}```", "run_tests", sandbox=sandbox)
    out = {"grader_cpu_s": cpu() - cpu0, "wall_s": time.time() - t0,
           "extra_peak_mib": (status("VmHWM:") - rss0) / 2**20,
           "score": verdict.score, "solve": verdict.solve, "reason": verdict.reason[:160]}
print(json.dumps(out))
'''


def probe_channel() -> dict:
    results = {}
    for name, attack in CHANNEL_ATTACKS.items():
        done = subprocess.run([sys.executable, "-c", CHANNEL_CHILD, attack], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            results[name] = {"error": done.stderr[-1500:]}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"  {name:28s} " + (f"grader CPU {r['grader_cpu_s']:6.3f} s, peak +{r['extra_peak_mib']:7.1f} MiB, "
                                  f"wall {r['wall_s']:5.2f} s, score {r['score']} | {r['reason'][:90]}"
                                  if "error" not in r else f"ERROR {r['error'][-300:]}"), flush=True)
    return results


def _run_raw(program: str):
    from reward.sandbox import Sandbox

    with Sandbox() as sandbox:
        return sandbox.run({"kind": "oracle", "program": program, "setup_code": "", "method": "f", "inputs": []})


def _facts(execution) -> dict:
    try:
        return json.loads(execution.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"unreadable": execution.stdout[-500:].decode("utf-8", "replace"),
                "stderr": execution.stderr[-800:].decode("utf-8", "replace"), "end": execution.describe_end()}


# ---- keyring ----
_KEYRING_PROGRAM = textwrap.dedent("""
    import ctypes, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    serial = libc.syscall(ctypes.c_long(248), b"user", b"gq-probe", b"left-by-an-earlier-execution",
                          ctypes.c_long(28), ctypes.c_long(-4))  # add_key(..., KEY_SPEC_USER_KEYRING)
    print(json.dumps({"uid": os.getuid(), "add_key": serial if serial >= 0 else -ctypes.get_errno()}))
""")


def _key_users(uid: int) -> str:
    with open("/proc/key-users") as f:
        return next((line.strip() for line in f if line.split(":")[0].strip() == str(uid)), "")


def _read_key_as(uid: int) -> str:
    """A fresh process of `uid` (as a later execution with the same uid would be) searches its user keyring."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            serial = libc.syscall(ctypes.c_long(250), ctypes.c_long(10), ctypes.c_long(-4), b"user", b"gq-probe",
                                  ctypes.c_long(0))  # keyctl(KEYCTL_SEARCH, @u, "user", "gq-probe", 0)
            if serial < 0:
                os.write(write_end, f"not found ({os.strerror(ctypes.get_errno())})".encode())
            else:
                buf = ctypes.create_string_buffer(256)
                n = libc.syscall(ctypes.c_long(250), ctypes.c_long(11), ctypes.c_long(serial), buf, ctypes.c_long(256))
                os.write(write_end, b"read: " + buf.raw[:max(n, 0)])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def probe_keyring() -> dict:
    facts = _facts(_run_raw(_KEYRING_PROGRAM))
    out = {"inside": facts}
    if "uid" in facts:
        out["key_users_after_exit"] = _key_users(facts["uid"])
        out["same_uid_reads"] = _read_key_as(facts["uid"])
    print(f"  inside: {facts}\n  /proc/key-users after the execution: {out.get('key_users_after_exit') or 'none'}"
          f"\n  a later process of that uid: {out.get('same_uid_reads')}")
    return out


# ---- system calls a graded program has no use for (x86_64 numbers) ----
_SYSCALL_PROGRAM = textwrap.dedent("""
    import ctypes, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(256)
    L = ctypes.c_long
    calls = {
        "keyctl(GET_KEYRING_ID, @u)": (250, L(0), L(-4), L(0)),
        "add_key(@u)": (248, b"user", b"k", b"v", L(1), L(-4)),
        "request_key": (249, b"user", b"k", None, L(0)),
        "ptrace(TRACEME)": (101, L(0), L(0), L(0), L(0)),
        "mount(tmpfs)": (165, b"none", b"/scratch", b"tmpfs", L(0), None),
        "unshare(NEWUSER)": (272, L(0x10000000)),
        "clone(NEWUSER)": (56, L(0x10000000 | 17), L(0), L(0), L(0), L(0)),
        "setns": (308, L(0), L(0)),
        "bpf(MAP_CREATE)": (321, L(0), buf, L(72)),
        "perf_event_open": (298, buf, L(0), L(-1), L(-1), L(0)),
        "io_uring_setup": (425, L(4), buf),
        "userfaultfd(USER_MODE_ONLY)": (323, L(1)),
        "process_vm_readv": (310, L(1), L(0), L(0), L(0), L(0), L(0)),
        "open_tree": (428, L(-100), b"/", L(0)),
        "fsopen(tmpfs)": (430, b"tmpfs", L(0)),
        "pidfd_getfd": (438, L(0), L(0), L(0)),
        "kcmp": (312, L(1), L(1), L(0), L(0), L(0)),
        "chroot": (161, b"/scratch"),
    }
    out = {}
    for name, (nr, *args) in calls.items():
        buf.raw = bytes(256)
        if name == "clone(NEWUSER)":
            ret = libc.syscall(L(nr), *args)
            if ret == 0:
                os._exit(0)
            if ret > 0:
                os.waitpid(ret, 0)
        else:
            ret = libc.syscall(L(nr), *args)
        out[name] = "ok" if ret >= 0 else os.strerror(ctypes.get_errno())
    print(json.dumps(out))
""")


def probe_syscalls() -> dict:
    facts = _facts(_run_raw(_SYSCALL_PROGRAM))
    for name, result in facts.items():
        print(f"  {name:30s} {result}")
    return facts


# ---- host paths ----
_PATHS_PROGRAM = textwrap.dedent("""
    import json, os, sys
    NEEDLES = @NEEDLES@
    def found(text):
        return sorted({n for n in NEEDLES if n in text})
    def read(path):
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return ""
    channels = {
        "/proc/self/mountinfo": read("/proc/self/mountinfo"),
        "/proc/self/maps": read("/proc/self/maps"),
        "/proc/self/cmdline": read("/proc/self/cmdline"),
        "/proc/self/exe": (lambda: os.readlink("/proc/self/exe"))() if os.path.exists("/proc/self/exe") else "",
        "sys.path": repr(sys.path),
        "sys.executable/prefix": repr([sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix]),
        "sys.argv/orig_argv": repr([sys.argv, getattr(sys, "orig_argv", None)]),
        "module __file__": repr([getattr(m, "__file__", None) for m in list(sys.modules.values())]),
        "sysconfig build vars": repr(__import__("sysconfig").get_config_vars()),
        "code co_filename": repr([getattr(getattr(f, "__code__", None), "co_filename", None)
                                  for m in list(sys.modules.values()) for f in list(vars(m).values())]),
    }
    site_listing = {}
    for d in @SITE_DIRS@:
        try:
            site_listing[d] = len(os.listdir(d))
        except OSError as e:
            site_listing[d] = e.strerror
    print(json.dumps({"leaks": {k: found(v) for k, v in channels.items()}, "site_packages_entries": site_listing,
                      "proc_mounted": os.path.exists("/proc/self")}))
""")


def probe_paths() -> dict:
    import site
    import sysconfig

    import reward

    checkouts = {os.path.dirname(HERE), os.path.dirname(os.path.dirname(os.path.abspath(reward.__file__)))}
    needles = sorted({*checkouts, sys.base_prefix, "/root", "/work", "/home"} - {"/usr", "/"})
    base_site = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    site_dirs = sorted({base_site, *site.getsitepackages([sys.base_prefix]),
                        "/python/lib/python%d.%d/site-packages" % sys.version_info[:2]})
    program = _PATHS_PROGRAM.replace("@NEEDLES@", repr(needles)).replace("@SITE_DIRS@", repr(site_dirs))
    facts = _facts(_run_raw(program))
    for name, leaked in facts.get("leaks", {}).items():
        print(f"  {name:24s} {'LEAKS ' + ', '.join(leaked) if leaked else 'no host path'}")
    print(f"  /proc mounted inside: {facts.get('proc_mounted')}")
    for d, entries in facts.get("site_packages_entries", {}).items():
        print(f"  list {d}: {entries}")
    if "leaks" not in facts:
        print(f"  {facts}")
    return facts


PROBES = {"channel": probe_channel, "keyring": probe_keyring, "syscalls": probe_syscalls, "paths": probe_paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PROBES), help="comma-separated: " + ",".join(PROBES))
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    out = {}
    for name in args.only.split(","):
        print(f"[{name}]", flush=True)
        out[name] = PROBES[name]()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
