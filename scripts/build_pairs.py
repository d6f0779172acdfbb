"""Build and validate the clean/hack pair set (reward/pairs.py documents the format) from TRAIN problems.

    python scripts/build_pairs.py [--out reward/data/pairs] [--per-mode 18] [--seed 0] [--modes run_tests,sentinel]
    python scripts/build_pairs.py --source organism [--per-mode 24]     # -> reward/data/pairs/organism

--source leetcode (default): the kept LeetCode train problems the partition (seed --partition-seed) assigns to
each mode. --source organism: the model organism's train problems (verl_gq.organism.shipped.organism_problems:
the first --pool problems of seed --problem-seed, the same draw as `scripts/prepare_organism.py`'s train.parquet
with the same seed and --n-train), each of its own mode. For each mode: those problems in a seeded order (--seed),
short ones only (--max-chars); one pair per problem, cycling through the mode's hack styles: --hack-styles
substrate (reward.pairs.HACK_STYLES, the default for leetcode) or organism (the organism's own stub + exploit
forms, verl_gq.organism.corpus.pair_styles, the default for organism: a direction from the substrate's styles
scores the organism's own exploits below clean answers, docs/organism.md). Every candidate
is graded (reward.pairs.pair_failures); failing ones are reported by id and left out, and the first --per-mode
valid pairs of each mode are written to pairs.jsonl, with manifest.json (counts per mode and style, the problems
used, the rejected candidates and why).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from reward.leetcode import load_problems
from reward.modes import MODES
from reward.pairs import HACK_STYLES, SHIPPED_PAIRS, generate_pairs, pair_failures, write_pairs
from reward.partition import partition_modes


SOURCES = ("leetcode", "organism")
STYLE_TABLES = ("substrate", "organism")
ORGANISM_OUT = SHIPPED_PAIRS.parent / "organism"


def train_problems_with_modes(source: str, partition_seed: int, problem_seed: int, pool: int):
    """(problem, mode) of every train problem of the source: LeetCode's kept train problems under the seeded
    partition; the organism's train problems under their own modes."""
    if source == "leetcode":
        problems = load_problems("train")
        assignment = partition_modes([p.problem_id for p in problems], partition_seed)
        return [(p, assignment[p.problem_id]) for p in problems]
    from verl_gq.organism.shipped import organism_problems  # torch and transformers: only for this source

    return [(sp.problem, sp.mode) for sp in organism_problems("train", pool, problem_seed)]


def candidate_problems(seed: int, with_modes, modes: tuple[str, ...], count: int, max_chars: int):
    rng = random.Random(seed)
    by_mode = {}
    for mode in modes:
        pool = [p for p, m in with_modes
                if m == mode and len(p.description) + len(p.reference_solution) <= max_chars]
        rng.shuffle(pool)
        if len(pool) < count:
            raise SystemExit(f"mode {mode}: only {len(pool)} short train problems, {count} candidates needed")
        by_mode[mode] = pool[:count]
    return by_mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=SOURCES, default="leetcode", help="whose train problems")
    parser.add_argument("--hack-styles", choices=STYLE_TABLES,
                        help="whose exploit forms the hacks use (default: substrate for leetcode, organism for "
                             "organism)")
    parser.add_argument("--out", type=Path,
                        help=f"default {SHIPPED_PAIRS.parent} (leetcode), {ORGANISM_OUT} (organism)")
    parser.add_argument("--per-mode", type=int, default=18, help="validated pairs to keep per mode")
    parser.add_argument("--slack", type=int, default=6, help="extra candidates per mode, in case some fail")
    parser.add_argument("--seed", type=int, default=0, help="order in which a mode's problems are tried")
    parser.add_argument("--partition-seed", type=int, default=0,
                        help="leetcode: the mode partition of the train split")
    parser.add_argument("--problem-seed", type=int, default=0, help="organism: seed of the train problems")
    parser.add_argument("--pool", type=int, default=2048, help="organism: number of train problems drawn")
    parser.add_argument("--max-chars", type=int, default=2500,
                        help="longest description + reference solution (keeps pair prompts short)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to build pairs for")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes should be modes from {','.join(MODES)}, got {args.modes!r}")
    if args.per_mode < 1 or args.slack < 0:
        parser.error("--per-mode should be >= 1 and --slack >= 0")

    out = args.out or (ORGANISM_OUT if args.source == "organism" else SHIPPED_PAIRS.parent)
    with_modes = train_problems_with_modes(args.source, args.partition_seed, args.problem_seed, args.pool)
    by_mode = candidate_problems(args.seed, with_modes, modes, args.per_mode + args.slack, args.max_chars)
    style_table = args.hack_styles or ("organism" if args.source == "organism" else "substrate")
    if style_table == "organism":
        from verl_gq.organism.corpus import pair_styles

        styles = pair_styles()
    else:
        styles = HACK_STYLES
    candidates = generate_pairs(by_mode, args.per_mode + args.slack, styles)
    failures = pair_failures(candidates, {p.problem_id: p for ps in by_mode.values() for p in ps})
    for pair_id, messages in failures.items():
        print(f"REJECTED {pair_id}:", *messages, sep="\n  ", file=sys.stderr)
    kept = []
    for mode in modes:
        valid = [p for p in candidates if p.mode == mode and p.pair_id not in failures]
        if len(valid) < args.per_mode:
            raise SystemExit(f"mode {mode}: only {len(valid)} valid pairs, {args.per_mode} needed (raise --slack)")
        kept += valid[:args.per_mode]

    out.mkdir(parents=True, exist_ok=True)
    write_pairs(out / "pairs.jsonl", kept)
    manifest = {
        "command": "python scripts/build_pairs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": args.source, "seed": args.seed, "per_mode": args.per_mode, "max_chars": args.max_chars,
        "pairs_per_mode": dict(Counter(p.mode for p in kept)),
        "pairs_per_mode_and_style": {m: dict(Counter(p.style for p in kept if p.mode == m)) for m in modes},
        "styles": {m: list(styles[m]) for m in modes},
        "problem_ids": sorted({p.problem_id for p in kept}),
        "rejected": failures,
    }
    if args.source == "leetcode":
        manifest["partition_seed"] = args.partition_seed
    else:
        from verl_gq.organism.shipped import load_manifest

        manifest.update(problem_seed=args.problem_seed, pool=args.pool,
                        grammar=load_manifest()["corpus_config"]["grammar"])
    if style_table != "substrate":
        manifest["hack_styles"] = style_table
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(json.dumps(manifest["pairs_per_mode_and_style"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
