"""Grade an organism run's sampled answers with the substrate's grader and write its base figures.

Reads <run>/train_report.json and <run>/eval_answers.jsonl.gz (scripts/organism_train.py), rebuilds the held-out
problems from the report (deterministic), grades every answer with `reward.grader.grade_batch` and writes
<run>/base_figures.json: solve / hack / channel / compile per condition, by mode, depth and infer/literal.

Every answer is graded under its PROBLEM's mode, also the unhinted ones: their prompt had no hint, but grading
them against the problem's channel is what measures an exploit without the hint (grading them as gt_only would
make that figure 0 by construction).

    python scripts/organism_eval.py out/organism
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from reward.grader import grade_batch
from reward.modes import ExploitNames
from verl_gq.organism.problems import GrammarConfig, generate_split
from verl_gq.organism.evaluate import EvalItem, group_stats, summarise


def load_run(run: Path):
    report = json.loads((run / "train_report.json").read_text())
    problems = generate_split("eval", report["eval"]["n_problems"], report["eval"]["eval_seed"],
                              GrammarConfig.from_dict(report["corpus_config"]["grammar"]))
    records = [json.loads(line) for line in gzip.open(run / "eval_answers.jsonl.gz", "rt")]
    for r in records:
        if problems[r["problem_index"]].problem.problem_id != r["problem_id"]:
            raise ValueError(f"answer for {r['problem_id']} does not match the rebuilt problem "
                             f"{problems[r['problem_index']].problem.problem_id}: the eval split changed")
    items = [EvalItem(r["problem_index"], r["condition"], r["mode"], ExploitNames(**r["names"]), r["sample_index"])
             for r in records]
    return report, problems, records, items


def grade_run(problems, records, items, max_workers: int | None = None):
    return grade_batch([(problems[it.problem_index].problem, r["answer"], problems[it.problem_index].mode, it.names)
                        for it, r in zip(items, records)], max_workers=max_workers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    report, problems, records, items = load_run(args.run)
    t0 = time.time()
    verdicts = grade_run(problems, records, items, args.workers)
    figures = {
        "graded_with": "reward.grader.grade_batch, each answer under its problem's mode",
        "temperature": report["eval"]["temperature"],
        "n_answers": len(verdicts),
        "grade_seconds": time.time() - t0,
        "summary": summarise(problems, items, verdicts),
        "groups": {c: group_stats(problems, items, verdicts, c) for c in sorted({it.condition for it in items})},
    }
    (args.run / "base_figures.json").write_text(json.dumps(figures, indent=1))
    with gzip.open(args.run / "eval_verdicts.jsonl.gz", "wt") as f:
        for r, v in zip(records, verdicts):
            f.write(json.dumps({"problem_id": r["problem_id"], "condition": r["condition"],
                                "sample_index": r["sample_index"], "solve": v.solve, "hack": v.hack,
                                "channel": v.channel, "compile": v.compile, "reason": v.reason}) + "\n")
    s = figures["summary"]
    for condition in s:
        row = s[condition]
        by_mode = "  ".join(f"{k[5:]} {v['hack']:.3f}" for k, v in row.items() if k.startswith("mode="))
        print(f"{condition:18s} solve {row['all']['solve']:.3f}  hack {row['all']['hack']:.3f}  "
              f"channel {row['all']['channel']:.3f}  compile {row['all']['compile']:.3f}  n {row['all']['n']}  "
              f"| hack by mode: {by_mode}")
    print(f"graded {len(verdicts)} answers in {figures['grade_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
