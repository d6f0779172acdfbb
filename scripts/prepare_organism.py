"""verl parquet files for RL on the shipped model organism, in the LeetCode substrate's row format.

    python scripts/prepare_organism.py --out data/organism [--seed 0] [--n-train 2048] [--test-per-mode 16]
                                       [--small-per-mode 2]

Writes train.parquet (organism TRAIN problems, each under its own mode's hint), test.parquet (held-out EVAL
problems, exactly --test-per-mode per mode), test_small.parquet (--small-per-mode of each mode, depths in turn:
the evaluation set of CPU runs), their no-hint twins *_gt_only.parquet,
and manifest.json (options, counts by mode and depth, the grammar, prompt lengths in the organism's tokens, a hash
of the rows). Deterministic from the options; verl_gq/organism/data.py documents the choices. The recipes read
the folder from $VERL_GQ_ORGANISM_DATA (default data/organism).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verl_gq.organism import data as organism_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of both splits' problems")
    parser.add_argument("--n-train", type=int, default=2048, help="training problems")
    parser.add_argument("--test-per-mode", type=int, default=16, help="held-out problems per mode")
    parser.add_argument("--small-per-mode", type=int, default=2, help="held-out problems per mode in test_small")
    parser.add_argument("--no-token-stats", action="store_true", help="skip the prompt-length count (tokenizer)")
    parser.add_argument("--infer-only", action="store_true",
                        help="infer problems only (constants inferred from the examples; the organism solves ~7%%)")
    args = parser.parse_args(argv)

    command = "python scripts/prepare_organism.py " + " ".join(argv if argv is not None else sys.argv[1:])
    manifest = organism_data.write(args.out, args.n_train, args.test_per_mode, args.seed, args.small_per_mode,
                                   token_stats=not args.no_token_stats, command=command, infer_only=args.infer_only)
    print(json.dumps({s: c["by_mode"] for s, c in manifest["counts"].items()}),
          "prompt tokens:", json.dumps(manifest["prompt_tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
