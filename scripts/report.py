#!/usr/bin/env python
"""One command from a folder of runs to every table and figure of the paper.

    python scripts/report.py out/runs [--out out/report] [--baseline as_trained] [--alpha 0.05]
                             [--seeds 0 1 2 3 4] [--long-run-arms route2b_long vanilla_long] [--strict]

Reads only run artifacts (docs/outputs.md). Writes into --out: keynote, ablation and held_out_modes tables as
.csv (numbers) and .md (display), training_curves.png/.csv, long_run.png/.csv, problems.txt, and report.md with
all of it. Every run or seed left out is named in problems.txt and on stderr; --strict exits 1 if there is any.
Arms: each router's deployed model, `<experiment>:as_trained` (a run with routers as trained: vanilla's training by
construction) and `vanilla` (a run without routers); the baseline defaults to the one as-trained arm if there is
exactly one, else vanilla.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verl_gq.eval.report.collect import collect_runs, default_baseline
from verl_gq.eval.report.figures import default_long_run_arms, long_run, training_curves
from verl_gq.eval.report.tables import ablation_table, held_out_table, keynote_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder whose subfolders are run folders (out/runs)")
    parser.add_argument("--out", type=Path, help="output folder (default: <runs>/../report)")
    parser.add_argument("--baseline", help="arm every other arm is compared with (default: the one "
                        "<experiment>:as_trained arm, else vanilla)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired tests")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds every arm should have (default: all seen)")
    parser.add_argument("--long-run-arms", nargs="+",
                        help="arms of the long-run figure (default: arms that ran past the baseline's step)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any run or seed is missing or left out")
    args = parser.parse_args(argv)
    if not 0.0 < args.alpha < 1.0:
        parser.error(f"--alpha must lie in (0, 1), got {args.alpha}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or args.runs.resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    runset = collect_runs(args.runs, args.seeds)
    args.baseline = args.baseline or default_baseline(list(runset.arms))
    problems = [str(p) for p in runset.problems]

    sections = [f"# Report on {args.runs}\n"]
    if runset.arms:
        for table in (keynote_table(runset, args.baseline, args.alpha), ablation_table(runset, args.baseline),
                      held_out_table(runset, args.baseline, args.alpha)):
            table.frame.to_csv(out / f"{table.name}.csv", index=False)
            (out / f"{table.name}.md").write_text(table.markdown)
            sections.append(table.markdown)
        png, _ = training_curves(runset, out)
        sections.append(f"## Training curves\n\n![training curves]({png.name}) (numbers: training_curves.csv)\n")
        long_arms = args.long_run_arms or default_long_run_arms(runset, args.baseline)
        if long_arms:
            png, _ = long_run(runset, long_arms, out)
            sections.append(f"## Long runs: {', '.join(long_arms)}\n\n![long runs]({png.name}) (numbers: long_run.csv)\n")
        else:
            sections.append(f"## Long runs\n\nNone: no arm ran past the {args.baseline} step; "
                            f"choose arms with --long-run-arms.\n")
    else:
        problems.append("no complete run in any arm: no table or figure written")
    if args.baseline not in runset.arms:
        problems.append(f"baseline arm {args.baseline!r} has no complete run: no arm is compared")

    (out / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    sections.append("## Problems\n\n" + ("".join(f"- {p}\n" for p in problems) if problems else "None.\n"))
    (out / "report.md").write_text("\n".join(sections))

    for p in problems:
        print(f"PROBLEM {p}", file=sys.stderr)
    arms = ", ".join(f"{arm} ({len(runs)} seeds)" for arm, runs in runset.arms.items())
    print(f"report written to {out}: arms {arms or 'none'}; {len(problems)} problem(s)"
          f"{' (see problems.txt)' if problems else ''}")
    return 1 if args.strict and problems else 0


if __name__ == "__main__":
    sys.exit(main())
