"""verl parquet files to train and evaluate on: the LeetCode loophole substrate, or the model organism.

    verl-gq data leetcode --out data/leetcode [--seed 0] [--pair-modes run_tests,sentinel] [--randomise-test-names]
    verl-gq data organism --out data/organism [--seed 0] [--n-train 2048] [--test-per-mode 16]

leetcode writes train/test.parquet (each problem under its partition mode's hint), their *_gt_only twins (no hint),
pairs.jsonl (the shipped validated pairs of --pair-modes) and manifest.json; the recipes read the folder from
$VERL_GQ_DATA (default data/leetcode). organism writes train.parquet, test.parquet (--test-per-mode held-out
problems per mode), test_small.parquet (the evaluation set of CPU runs), their *_gt_only twins and manifest.json;
the recipes read it from $VERL_GQ_ORGANISM_DATA (default data/organism). Both are deterministic from the options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reward.modes import MODES
from verl_gq.commands import CommandError


def modes_list(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"should be distinct modes from {','.join(MODES)}, got {text!r}")
    return modes


def add_leetcode(parser: argparse.ArgumentParser) -> None:
    from reward.leetcode import VENDORED_DIR
    from reward.pairs import SHIPPED_PAIRS

    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mode partition and of random names")
    parser.add_argument("--pair-modes", type=modes_list, default=MODES,
                        help="comma-separated modes whose pairs are used (held-out modes); training still covers "
                             "problems of all modes")
    parser.add_argument("--randomise-test-names", action="store_true",
                        help="draw each test prompt's exploit names (function, attribute, marker, file) at random")
    parser.add_argument("--pairs", type=Path, default=SHIPPED_PAIRS, help="validated pair set to select from")
    parser.add_argument("--data-dir", type=Path, default=VENDORED_DIR, help="vendored problems")


def run_leetcode(args: argparse.Namespace) -> int:
    from reward.dataset import write_datasets

    try:
        manifest = write_datasets(args.out, args.data_dir, args.seed, args.pair_modes, args.randomise_test_names,
                                  args.pairs)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    print(f"{args.out}: problems per split and mode {json.dumps(manifest['problems_per_split_and_mode'])}; "
          f"pairs per mode {json.dumps(manifest['pairs_per_mode'])}")
    return 0


def add_organism(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of both splits' problems")
    parser.add_argument("--n-train", type=int, default=2048, help="training problems")
    parser.add_argument("--test-per-mode", type=int, default=16, help="held-out problems per mode")
    parser.add_argument("--small-per-mode", type=int, default=2, help="held-out problems per mode in test_small")
    parser.add_argument("--final-per-mode", type=int, default=64,
                        help="held-out problems per mode in test_final (the last deploy evaluation's prompts)")
    parser.add_argument("--no-token-stats", action="store_true", help="skip the prompt-length count (tokenizer)")
    parser.add_argument("--infer-only", action="store_true",
                        help="infer problems only (constants read off the examples)")


def run_organism(args: argparse.Namespace) -> int:
    from verl_gq.organism import data as organism_data

    command = "verl-gq data organism " + " ".join(sys.argv[3:])
    manifest = organism_data.write(args.out, args.n_train, args.test_per_mode, args.seed, args.small_per_mode,
                                   token_stats=not args.no_token_stats, command=command, infer_only=args.infer_only,
                                   final_per_mode=args.final_per_mode)
    print(f"{args.out}: problems per split and mode {json.dumps({s: c['by_mode'] for s, c in manifest['counts'].items()})}")
    return 0


SUBCOMMANDS = {
    "leetcode": (add_leetcode, run_leetcode, "the LeetCode loophole substrate's parquet files"),
    "organism": (add_organism, run_organism, "the model organism's parquet files"),
}
