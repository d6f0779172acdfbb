"""Vendor the LeetCode problems once (the result is shipped in reward/data/leetcode/): the raw upstream files of
newfacade/LeetCodeDataset (MIT) -> Problem records + screen.json.

    python scripts/vendor_leetcode.py --raw-dir RAW_DIR

It grades every reference solution with the strict oracle (mode gt_only) under the sandbox's default limits and
records the outcome in screen.json, so building the datasets (`verl-gq data leetcode`, and CI) never regrades.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from reward.leetcode import (RAW_FILES, SCREEN_FILE, VENDORED_DIR, ProblemScreen, constant_expected, problems_path,
                             raw_splits, write_problems)
from reward.pairs import fenced
from reward.problem import Problem


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def grade_references(problems: list[Problem], workers: int) -> list[tuple[bool, str]]:
    """(reference passed the oracle in mode gt_only, reason) per problem, graded with the sandbox's default limits.

    Each problem gets a sandbox of its own, so one that breaks the sandbox cannot spoil the others' verdicts; a
    sandbox failure raises (it is not the reference's fault). A problem the grader rejects as broken (ProblemError,
    e.g. setup code importing a module the stdlib-only sandbox lacks) is screened out with that reason."""
    from reward.grader import ProblemError, grade  # the sandbox: only the vendor step executes code
    from reward.sandbox import Sandbox

    def one(problem: Problem) -> tuple[bool, str]:
        with Sandbox() as sandbox:
            try:
                verdict = grade(problem, fenced(problem.reference_solution), "gt_only", sandbox=sandbox)
            except ProblemError as exc:
                return False, f"problem error: {exc}"
        if "sandbox error" in verdict.reason:
            raise RuntimeError(f"problem {problem.problem_id}: the sandbox failed grading the reference: "
                               f"{verdict.reason}")
        return bool(verdict.solve), verdict.reason

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, problems))


def vendor(raw_dir: Path, out_dir: Path, workers: int) -> None:
    from reward.sandbox import SandboxLimits

    out_dir.mkdir(parents=True, exist_ok=True)
    splits = raw_splits(raw_dir)
    screen: dict[str, dict] = {}
    for split, problems in splits.items():
        write_problems(problems_path(split, out_dir), problems)
        for problem, (passed, reason) in zip(problems, grade_references(problems, workers)):
            constant = constant_expected(problem)
            screen[problem.problem_id] = asdict(ProblemScreen(
                kept=passed and not constant, reference_passed=passed, constant_expected=constant, reason=reason))
        kept = sum(screen[p.problem_id]["kept"] for p in problems)
        passed = sum(screen[p.problem_id]["reference_passed"] for p in problems)
        print(f"{split}: {len(problems)} Medium+Hard problems, reference passed {passed}, kept {kept}")
    (out_dir / SCREEN_FILE).write_text(json.dumps(
        {"grader": {"mode": "gt_only", "sandbox_limits": asdict(SandboxLimits())}, "problems": screen},
        indent=1, sort_keys=True) + "\n")
    shutil.copyfile(raw_dir / "LICENSE", out_dir / "LICENSE")
    derivation = {
        "command": "python scripts/vendor_leetcode.py --raw-dir <upstream files>",
        "raw_sha256": {split: {"file": name, "sha256": sha256(raw_dir / name)} for split, name in RAW_FILES.items()},
        "vendored_sha256": {path.name: sha256(path) for path in sorted(out_dir.glob("problems-*.jsonl.gz"))},
    }
    (out_dir / "derivation.json").write_text(json.dumps(derivation, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-dir", type=Path, required=True, help="folder holding the upstream jsonl.gz files")
    parser.add_argument("--out", type=Path, default=VENDORED_DIR)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel gradings")
    args = parser.parse_args(argv)
    missing = [name for name in (*RAW_FILES.values(), "LICENSE") if not (args.raw_dir / name).is_file()]
    if missing:
        parser.error(f"--raw-dir {args.raw_dir} lacks {missing}")
    vendor(args.raw_dir, args.out, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
