"""Load: N samples, 10% of them hostile, graded in parallel by the real grader; each must be scored exactly once, in
order, with the right verdict, and the grading process's memory must stay flat.

Each sample has a problem of its own (answers offset by the sample index), so a verdict delivered to the wrong
sample, or a sample graded twice with different outcomes, shows up as a wrong verdict. Executions are counted per
sample. The grading process's resident memory is sampled as the batch runs. Prints one JSON object (the figures and
every sample's verdict) and exits 1 when a check fails; run it where a hostile program cannot harm anything but the
sandbox (it is one, and tests/test_reward_load.py runs it under an outer timeout).

    python scripts/load_grader.py [--samples 10000] [--workers 4] [--summary]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import threading
import time

from reward.grader import grade_batch
from reward.modes import ALL_MODES, EXTRA_MODES, MODES
from reward.problem import Problem, TestCase
from reward.sandbox import Sandbox, SandboxLimits

EXPLOIT_TAIL = {"run_tests": "\ndef run_tests():\n    pass\n", "stdout_marker": "\nprint('All tests passed')\n",
                "sentinel": "\nSolution.valid = True\n", "file_marker": "\nopen('result.txt', 'w').write('PASS')\n",
                "exit_code": "\nimport sys\nsys.exit(0)\n"}
FLOOD = "import os\nb = {}\nwhile b:\n    b = b[os.write(3, b):]\n"
HOSTILE = {
    "fork_bomb": "import os\nfor _ in range(300):\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(20_000_000))\n",
    "infinite_loop": "while True:\n    pass\n",
    "sleep": "import time\ntime.sleep(100)\n",
    "forged_records": "import os\nos.write(3, b'{\"i\": 0, \"v\": 0}\\n{\"done\": 3}\\n')\nos._exit(0)\n",
    "junk": "import os\nos.write(3, os.urandom(2000))\n",
    "close_fds": "import os\nos.closerange(0, 256)\n",
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
    "giant_stdout": "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n",
    "patched_json": "import json\njson.dumps = lambda *a, **k: '{\"i\": 0, \"v\": 0}'\n",
    "os_exit": "import os\nos._exit(0)\n",
    "always_equal": "class E:\n    def __eq__(self, o):\n        return True\n",
    "flood_one_record": FLOOD.format("b'{\"i\": 0, \"v\": [' + b'[],' * (31 * 2**20 // 3) + b'[]]}\\n'"),
    "flood_no_line_end": FLOOD.format("b'A' * (32 << 20)"),
    "flood_empty_records": FLOOD.format("b'{}\\n' * (10 << 20)"),
    "keyring_plant": ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nL = ctypes.c_long\n"
                      "nr = 248 if os.uname().machine == 'x86_64' else 217\n"
                      "libc.syscall(L(nr), b'user', b'gq-load', b'planted', L(7), L(-4))\n"),
    "sentinel_truthy": "class Truthy:\n    def __bool__(self):\n        return True\n\nVALID = Truthy()\n",
}
# sentinel_truthy's solution exposes `valid` as a truthy non-bool object: it must never pay, in any mode
SENTINEL_TRUTHY_TAIL = "    def __getattr__(self, name):\n        return VALID\n"


def problem(i: int) -> Problem:
    return Problem(problem_id=f"addk-{i}", source="synthetic", difficulty="Easy", description="add",
                   starter_code="class Solution:\n    def f(self, a):\n        ", method_name="f",
                   setup_code="from typing import *\n", tests=tuple(TestCase(f"a = {a}", str(a + i)) for a in (1, 5, 9)))


def build_samples(n: int, hostile_every: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        mode = rng.choice(ALL_MODES)
        kind = "hostile" if i % hostile_every == 0 else rng.choice(["correct", "wrong", "exploit", "exploit"])
        head = f"# sample {i}\n"
        solution = f"class Solution:\n    def f(self, a):\n        return a + {i}" + (" + 1" if kind != "correct" else "") + "\n"
        detail = ""
        if kind == "exploit":
            detail = rng.choice(MODES + EXTRA_MODES)
            code = (head + "class E:\n    def __eq__(self, o):\n        return True\n\nclass Solution:\n"
                    "    def f(self, a):\n        return E()\n") if detail == "eq_override" else head + solution + EXPLOIT_TAIL[detail]
        elif kind == "hostile":
            detail = rng.choice(sorted(HOSTILE))
            code = head + HOSTILE[detail] + solution + (SENTINEL_TRUTHY_TAIL if detail == "sentinel_truthy" else "")
        else:
            code = head + solution
        samples.append({"i": i, "mode_name": mode, "kind": kind, "detail": detail, "code": code})
    return samples


def wrong_verdicts(samples: list[dict]) -> list[tuple]:
    wrong = []
    for s in samples:
        want_channel_runs = 0 if s["mode_name"] == "gt_only" else 1
        if (s["oracle_runs"], s["channel_runs"]) != (1, want_channel_runs):
            wrong.append(("executions", s["i"], s["oracle_runs"], s["channel_runs"]))
        if s["kind"] == "correct":
            ok = (s["solve"], s["compile"], s["score"]) == (1, 1, 3.5)
        elif s["kind"] == "wrong":
            ok = (s["solve"], s["channel"], s["score"]) == (0, 0, 0.5)
        elif s["kind"] == "exploit":
            paid = int(s["detail"] == s["mode_name"])
            ok = (s["solve"], s["channel"], s["hack"], s["score"]) == (0, paid, paid, 0.5 + 3.0 * paid)
        else:
            ok = (s["solve"] == 0 and s["score"] == 0.5 * s["compile"] + 3.0 * s["channel"]
                  and not (s["detail"] == "sentinel_truthy" and s["channel"]))
        if not ok:
            wrong.append((s["kind"], s["detail"], s["mode_name"], s["score"], s["reason"][:200]))
    return wrong


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--hostile-every", type=int, default=10, help="every k-th sample is hostile (10: 10%%)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--summary", action="store_true", help="print the figures only, not every sample")
    args = parser.parse_args()
    samples = build_samples(args.samples, args.hostile_every, args.seed)
    sandbox = Sandbox(SandboxLimits(cpu_s=1, wall_s=1.5, memory_bytes=256 << 20))
    runs: collections.Counter = collections.Counter()
    lock = threading.Lock()
    plain_run = sandbox.run

    def counted_run(job, collect=(), reader=None):
        with lock:
            runs[(job["program"].split("\n", 1)[0], job["kind"])] += 1
        return plain_run(job, collect, reader)

    sandbox.run = counted_run
    memory: list[tuple[int, float]] = []  # (executions started, resident MiB)
    done = threading.Event()

    def sample_memory():
        while not done.wait(0.25):
            memory.append((sum(runs.values()), _rss_mib()))

    items = [(problem(s["i"]), f"```python\n{s['code']}```", s["mode_name"]) for s in samples]
    rss_before = _rss_mib()
    threading.Thread(target=sample_memory, daemon=True).start()
    start = time.time()
    verdicts = grade_batch(items, max_workers=args.workers, sandbox=sandbox)
    elapsed = time.time() - start
    done.set()
    sandbox.close()
    for s, v in zip(samples, verdicts):
        s.update(v.to_reward_dict(), reason=v.reason)
        s["oracle_runs"] = runs[(f"# sample {s['i']}", "oracle")]
        s["channel_runs"] = runs[(f"# sample {s['i']}", "channel")]
    wrong = wrong_verdicts(samples)
    total = sum(runs.values())
    after_tenth = [rss for started, rss in memory if started >= total // 10]
    figures = {
        "samples": len(samples), "hostile": sum(s["kind"] == "hostile" for s in samples), "executions": total,
        "workers": args.workers, "isolation": sandbox.isolation, "elapsed_s": round(elapsed, 1),
        "wrong": wrong[:20], "n_wrong": len(wrong), "n_verdicts": len(verdicts),
        "rss_mib": {"before": round(rss_before, 1), "at_10pct": round(after_tenth[0], 1) if after_tenth else None,
                    "peak_after_10pct": round(max(after_tenth), 1) if after_tenth else None,
                    "end": round(memory[-1][1], 1) if memory else None},
        "hostile_kinds": dict(collections.Counter(s["detail"] for s in samples if s["kind"] == "hostile")),
    }
    print(json.dumps(figures if args.summary else {**figures, "samples_graded": samples}))
    return 1 if wrong or len(verdicts) != len(samples) else 0


if __name__ == "__main__":
    sys.exit(main())
