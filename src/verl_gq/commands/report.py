"""From a folder of run folders to every table and figure: keynote, ablation and held-out-modes tables (.csv numbers,
.md display), training curves and long runs (.png with the .csv they plot), problems.txt, and report.md with all of
it. Reads only run artifacts (docs/outputs.md).

    verl-gq report out/runs [--out out/report] [--baseline ARM] [--alpha 0.05] [--seeds 41 42 43]
                   [--long-run-arms A B] [--strict] [--preregistered REV]

Arms: each router's deployed model, `<experiment>:as_trained` (a run with routers as trained: vanilla's training by
construction) and `vanilla` (a run without routers); every arm is compared with the baseline, paired by seed; the
baseline defaults to the one as-trained arm if there is exactly one, else vanilla. Every run or seed left out is
named in problems.txt and on stderr; --strict exits 1 if there is any. --preregistered REV leaves out every run whose
recorded commit does not descend from REV in this checkout (or records none, or was dirty): a preregistered study's
tables hold only runs made after its preregistration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, help="folder whose subfolders are run folders (out/runs)")
    parser.add_argument("--out", type=Path, help="output folder (default: <runs>/../report)")
    parser.add_argument("--baseline", help="arm every other arm is compared with")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired tests")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds every arm should have (default: all seen)")
    parser.add_argument("--long-run-arms", nargs="+",
                        help="arms of the long-run figure (default: arms that ran past the baseline's step)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any run or seed is missing or left out")
    parser.add_argument("--preregistered", metavar="REV",
                        help="leave out every run whose recorded commit does not descend from REV (the "
                             "preregistration's commit) in the git checkout of the current directory")


def run(args: argparse.Namespace) -> int:
    from verl_gq.commands import CommandError

    try:
        from verl_gq.eval.report.collect import collect_runs, default_baseline
        from verl_gq.eval.report.figures import default_long_run_arms, long_run, training_curves
        from verl_gq.eval.report.tables import ablation_table, held_out_table, keynote_table
    except ModuleNotFoundError as error:
        if error.name not in ("scipy", "matplotlib"):
            raise
        raise CommandError(f"the report needs {error.name}: pip install 'verl-gq[report]'") from None

    if not 0.0 < args.alpha < 1.0:
        raise CommandError(f"--alpha must lie in (0, 1), got {args.alpha}")
    out = args.out or args.runs.resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        runset = collect_runs(args.runs, args.seeds, after_commit=args.preregistered)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    baseline = args.baseline or default_baseline(list(runset.arms))
    problems = [str(p) for p in runset.problems]

    sections = [f"# Report on {args.runs}\n"]
    if runset.arms:
        for table in (keynote_table(runset, baseline, args.alpha), ablation_table(runset, baseline),
                      held_out_table(runset, baseline, args.alpha)):
            table.frame.to_csv(out / f"{table.name}.csv", index=False)
            (out / f"{table.name}.md").write_text(table.markdown)
            sections.append(table.markdown)
        png, _ = training_curves(runset, out)
        sections.append(f"## Training curves\n\n![training curves]({png.name}) (numbers: training_curves.csv)\n")
        long_arms = args.long_run_arms or default_long_run_arms(runset, baseline)
        if long_arms:
            png, _ = long_run(runset, long_arms, out)
            sections.append(f"## Long runs: {', '.join(long_arms)}\n\n![long runs]({png.name}) (numbers: long_run.csv)\n")
        else:
            sections.append(f"## Long runs\n\nNone: no arm ran past the {baseline} step; choose arms with "
                            "--long-run-arms.\n")
    else:
        problems.append("no complete run in any arm: no table or figure written")
    if baseline not in runset.arms:
        problems.append(f"baseline arm {baseline!r} has no complete run: no arm is compared")

    (out / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    sections.append("## Problems\n\n" + ("".join(f"- {p}\n" for p in problems) if problems else "None.\n"))
    (out / "report.md").write_text("\n".join(sections))

    for p in problems:
        print(f"PROBLEM {p}", file=sys.stderr)
    arms = ", ".join(f"{arm} ({len(runs)} seeds)" for arm, runs in runset.arms.items())
    print(f"report written to {out}: arms {arms or 'none'}; baseline {baseline}; {len(problems)} problem(s)"
          f"{' (see problems.txt)' if problems else ''}")
    return 1 if args.strict and problems else 0
