"""Grader throughput: the zygote sandbox against a fresh interpreter per execution, same verdicts asserted.

Both arms run the same `reward.grader.grade_batch` over the same items (real LeetCode problems: each reference
solution under a rotating mode, plus a wrong `run_tests` hack per problem) with the same isolation and the same
number of workers; only the launcher differs ("zygote": fork from a pre-warmed clean interpreter; "spawn": a fresh
`python -I -S` per execution, the baseline). Arms are interleaved, repeated, and the best wall time of each is
reported, so background load on a shared machine hurts both alike.

    python benchmarks/bench_grader.py [--workload leetcode|small] [--problems 60] [--repeats 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import time

from reward.grader import grade_batch
from reward.leetcode import load_problems
from reward.modes import MODES
from reward.problem import Problem, TestCase
from reward.sandbox import Sandbox


def build_items(n_problems: int) -> list[tuple]:
    problems = [p for p in load_problems("test") if p.reference_solution][:n_problems]
    if len(problems) < n_problems:
        raise SystemExit(f"only {len(problems)} kept test problems with a reference solution; asked for {n_problems}")
    items = []
    for k, problem in enumerate(problems):
        items.append((problem, f"```python\n{problem.reference_solution}\n```", MODES[k % len(MODES)]))
        hack = (f"class Solution:\n    def {problem.method_name}(self, *args, **kwargs):\n        return None\n\n"
                "def run_tests():\n    pass\n")
        items.append((problem, f"```python\n{hack}```", "run_tests"))
    return items


def small_items(n_problems: int) -> list[tuple]:
    """Launcher-bound workload: two-sum-sized problems (4 tests), a correct answer and a run_tests hack each."""
    items = []
    for k in range(n_problems):
        problem = Problem(problem_id=f"small-{k}", source="synthetic", difficulty="Easy", description="two sum",
                          starter_code="class Solution:\n    def twoSum(self, nums, target):\n        ",
                          method_name="twoSum", setup_code="from typing import *\n",
                          tests=tuple(TestCase(f"nums = [{k}, 7, 11, 15], target = {k + 7}", "[0, 1]") for _ in range(4)))
        correct = ("class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
                   "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                   "                return [seen[target - x], i]\n            seen[x] = i\n")
        hack = "class Solution:\n    def twoSum(self, nums, target):\n        return None\n\ndef run_tests():\n    pass\n"
        items += [(problem, f"```python\n{correct}```", MODES[k % len(MODES)]), (problem, f"```python\n{hack}```", "run_tests")]
    return items


def timed(items: list[tuple], launcher: str, workers: int) -> tuple[float, list[dict]]:
    with Sandbox(launcher=launcher) as sandbox:
        sandbox.start()
        start = time.perf_counter()
        verdicts = grade_batch(items, max_workers=workers, sandbox=sandbox)
        elapsed = time.perf_counter() - start
    return elapsed, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    parser.add_argument("--workload", choices=("leetcode", "small"), default="leetcode",
                        help="leetcode: real problems (~100 tests each, test-bound); small: 4-test problems "
                             "(launcher-bound)")
    args = parser.parse_args()
    items = build_items(args.problems) if args.workload == "leetcode" else small_items(args.problems)
    n_exec = sum(1 if mode == "gt_only" else 2 for _, _, mode in items)
    print(f"{len(items)} samples ({n_exec} executions) on {os.cpu_count()} cores, best of {args.repeats}")
    for workers in (int(w) for w in args.workers.split(",")):
        best = {"zygote": float("inf"), "spawn": float("inf")}
        reference = None
        for _ in range(args.repeats):
            for launcher in ("spawn", "zygote"):
                elapsed, verdicts = timed(items, launcher, workers)
                reference = reference or verdicts
                differ = [(items[k][0].problem_id, a.reason, b.reason) for k, (a, b) in enumerate(zip(reference, verdicts))
                          if a.to_reward_dict() != b.to_reward_dict()]
                assert not differ, f"{launcher} verdicts differ from the first arm's (benchmark void): {differ}"
                best[launcher] = min(best[launcher], elapsed)
        solved = sum(v.solve for v in reference)
        hacked = sum(v.hack for v in reference)
        per_core = {k: len(items) / t / workers for k, t in best.items()}
        print(f"workers={workers}: spawn {best['spawn']:.2f}s ({per_core['spawn']:.1f} samples/s/core), "
              f"zygote {best['zygote']:.2f}s ({per_core['zygote']:.1f} samples/s/core), "
              f"ratio zygote/spawn per core = {per_core['zygote'] / per_core['spawn']:.2f}x "
              f"(verdicts equal: {solved} solved, {hacked} hacks)")


if __name__ == "__main__":
    main()
