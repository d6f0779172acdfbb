"""What the sandbox guarantees to one execution, observed from inside it (a probe program) and from outside."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from reward.sandbox import Sandbox, SandboxLimits, isolation_problems

pytestmark = pytest.mark.skipif(bool(isolation_problems()), reason="; ".join(isolation_problems()))

UID_BASE = 7_000_000
LIMITS = SandboxLimits(cpu_s=1, wall_s=2, memory_bytes=512 << 20, nproc=4, stdout_cap=64 << 10)

PROBE = """
import json, os, resource, socket
facts = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
         "cwd": os.getcwd(), "scratch": sorted(os.listdir('.')), "root": sorted(os.listdir('/')),
         "procs": sorted(p for p in os.listdir('/proc') if p.isdigit()),
         "work_visible": os.path.exists('/work'), "host_tmp_visible": os.path.exists('@HOST_FILE@'),
         "no_new_privs": [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0],
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


def _job(program: str) -> dict:
    return {"kind": "oracle", "program": program, "setup_code": "", "method": "f", "inputs": []}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(LIMITS, uid_base=UID_BASE) as sb:
        yield sb


def test_execution_runs_unprivileged_in_its_own_namespaces_and_sees_only_its_scratch(sandbox, tmp_path):
    host_file = tmp_path / "host_only.txt"
    host_file.write_text("host")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    program = PROBE.replace("@HOST_FILE@", str(host_file)).replace("@PORT@", str(listener.getsockname()[1]))
    first, second = sandbox.run(_job(program)), sandbox.run(_job(program))
    listener.close()
    f1, f2 = (json.loads(e.stdout) for e in (first, second))
    assert f1["uid"] == f1["euid"] == f1["gid"] and f1["uid"] >= UID_BASE, f"should run as its own uid: {f1}"
    assert f1["uid"] != f2["uid"] or first is second, "two executions should not need to share a uid"
    assert f1["groups"] == [] and f1["no_new_privs"] == "1", "no supplementary groups, no_new_privs set"
    assert f1["pid"] == 1 and f1["procs"] == ["1"], f"own pid namespace, nothing else visible: {f1['procs']}"
    assert f1["cwd"] == "/scratch" and f1["scratch"] == [] and f2["scratch"] == [], (
        "each execution starts in an empty private scratch dir (a file left by the first is not seen by the second)")
    assert not f1["work_visible"] and not f1["host_tmp_visible"], "host directories must be invisible"
    assert set(f1["root"]) <= {"usr", "bin", "lib", "lib64", "lib32", "libx32", "sbin", "etc", "dev", "proc",
                               "scratch", "tmp", "root", "packages"}, f"unexpected sandbox root entries: {f1['root']}"
    assert f1["sortedcontainers"] == [1, 2, 3] and f1["packages_writable"] is False, (
        "the vendored packages are importable and read-only")
    assert f1["loopback_reached_host"] is False, "the network namespace should not reach the host's loopback"
    assert f1["rlimits"] == {"RLIMIT_CPU": LIMITS.cpu_s, "RLIMIT_AS": LIMITS.memory_bytes,
                             "RLIMIT_FSIZE": LIMITS.fsize_bytes, "RLIMIT_NPROC": LIMITS.nproc,
                             "RLIMIT_NOFILE": LIMITS.nofile, "RLIMIT_CORE": 0}
    assert not (tmp_path / "left_behind.txt").exists()


def test_process_limit_holds_for_the_unprivileged_uid(sandbox):
    program = ("import os, time\nmade = 0\nfor _ in range(50):\n    try:\n        if os.fork() == 0:\n"
               "            time.sleep(5)\n            os._exit(0)\n        made += 1\n    except OSError:\n"
               "        break\nprint(made)\n")
    execution = sandbox.run(_job(program))
    assert int(execution.stdout) == LIMITS.nproc - 1, (
        f"RLIMIT_NPROC={LIMITS.nproc} should stop forking after {LIMITS.nproc - 1} children: {execution}")
    assert not execution.timed_out, "the sleeping children die with the namespace's init; nothing waits for them"


def test_cpu_and_wall_limits_kill_and_report(sandbox):
    spin, sleep = sandbox.run(_job("while True:\n    pass\n")), sandbox.run(_job("import time\ntime.sleep(60)\n"))
    assert spin.signal in (signal.SIGXCPU, signal.SIGKILL) or spin.timed_out, f"a spin must be killed: {spin}"
    assert sleep.timed_out and "wall-clock" in sleep.describe_end(), f"a sleeper is killed at the wall clock: {sleep}"


def test_output_past_its_cap_is_cut_and_reported(sandbox):
    execution = sandbox.run(_job("import sys\nwhile True:\n    sys.stdout.write('A' * 4096)\n"))
    assert "stdout" in execution.overflow and len(execution.stdout) == LIMITS.stdout_cap
    assert not execution.timed_out, "closing the stream at its cap ends the writer quickly (EPIPE)"


def test_zygote_and_fresh_interpreter_launchers_give_the_same_records():
    job = {"kind": "oracle", "program": "class Solution:\n    def f(self, a):\n        return [a, (a,), {a: str(a)}]\n",
           "setup_code": "from typing import *\n", "method": "f",
           "inputs": [compile(f"dict({source})", "<input>", "eval") for source in ("a = 1", "a = 2")]}
    with Sandbox(LIMITS, launcher="zygote") as zygote, Sandbox(LIMITS, launcher="spawn") as spawn:
        a, b = zygote.run(job), spawn.run(job)
    assert a.records == b.records and a.exit_code == b.exit_code == 0, f"{a} vs {b}"
