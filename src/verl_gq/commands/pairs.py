"""The clean/hack pair set the routers' directions and bands come from (reward/pairs.py documents the format).

    verl-gq pairs build [--source leetcode|organism] [--contrast solution|minimal] [--out DIR] [--per-mode 18]
                        [--modes run_tests,sentinel]
    verl-gq pairs validate FILE [--source leetcode|organism]
    verl-gq pairs calibrate FILE --model DIR|organism [--direction-ranks 1,2,4] [--quantiles 0.9,0.1 ...]

build makes pairs from TRAIN problems: for each mode its problems in a seeded order, short ones only, one pair per
problem cycling through the mode's hack styles. A "solution" pair contrasts the reference solution with a stub plus
the exploit; a "minimal" pair contrasts an attempt that does not solve (the organism: one of its corpus's wrong
answers; LeetCode: the stub) with the same attempt plus the exploit, so the two differ by the exploit alone. Every
candidate is graded (the clean answer solves under the strict oracle, or for a minimal pair earns nothing; the
hack fails the oracle, pays on its own mode's channel and on no other), failing ones are reported and left out,
and the first --per-mode valid pairs of each mode go to DIR/pairs.jsonl with DIR/manifest.json (counts per mode and
style, the problems used, the rejected candidates and why). validate checks a pair file's every line, then grades
every pair the same way; it exits 1 naming each failing pair. calibrate measures each candidate direction rank and
band quantile pair on held-out pairs (verl_gq.routing.calibration: the routed fraction of held-out hack and clean
completions, the AUC) and names the one the rule picks: router settings from the pairs alone, never from graded
samples of the model under study.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from reward.modes import MODES
from verl_gq.commands import CommandError
from verl_gq.commands.data import modes_list

SOURCES = ("leetcode", "organism")


def train_problems(source: str, partition_seed: int, problem_seed: int, pool: int) -> list:
    """(problem, mode) of every train problem of the source: LeetCode's kept train problems under the seeded
    partition; the organism's train problems under their own modes."""
    if source == "leetcode":
        from reward.leetcode import load_problems
        from reward.partition import partition_modes

        problems = load_problems("train")
        assignment = partition_modes([p.problem_id for p in problems], partition_seed)
        return [(p, assignment[p.problem_id]) for p in problems]
    from verl_gq.organism.shipped import organism_problems

    return [(sp.problem, sp.mode) for sp in organism_problems("train", pool, problem_seed)]


def add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="leetcode", help="whose train problems")
    parser.add_argument("--partition-seed", type=int, default=0, help="leetcode: the mode partition of train")
    parser.add_argument("--problem-seed", type=int, default=0, help="organism: seed of the train problems")
    parser.add_argument("--pool", type=int, default=2048, help="organism: number of train problems drawn")


def add_build(parser: argparse.ArgumentParser) -> None:
    add_source(parser)
    parser.add_argument("--hack-styles", choices=("substrate", "organism"),
                        help="whose exploit forms the hacks use (default: the source's)")
    parser.add_argument("--contrast", choices=("solution", "minimal"), default="solution",
                        help="clean = the reference solution (hack: a stub plus the exploit), or minimal: clean = an "
                             "attempt that does not solve, hack = the same attempt plus the exploit")
    parser.add_argument("--out", type=Path, help="output folder (default: the shipped pair set of the source; "
                                                 "its minimal/ subfolder for --contrast minimal)")
    parser.add_argument("--per-mode", type=int, default=18, help="validated pairs to keep per mode")
    parser.add_argument("--slack", type=int, default=6, help="extra candidates per mode, in case some fail")
    parser.add_argument("--seed", type=int, default=0, help="order in which a mode's problems are tried")
    parser.add_argument("--max-chars", type=int, default=2500,
                        help="longest description + reference solution (keeps pair prompts short)")
    parser.add_argument("--modes", type=modes_list, default=MODES, help="comma-separated modes to build pairs for")


def run_build(args: argparse.Namespace) -> int:
    from reward.pairs import HACK_STYLES, SHIPPED_PAIRS, generate_pairs, pair_failures, stub_solution, write_pairs
    from verl_gq.organism.shipped import ORGANISM_PAIRS

    if args.per_mode < 1 or args.slack < 0:
        raise CommandError("--per-mode should be >= 1 and --slack >= 0")
    minimal = args.contrast == "minimal"
    out = args.out or (ORGANISM_PAIRS.parent if args.source == "organism" else SHIPPED_PAIRS.parent)
    if args.out is None and minimal:
        out = out / "minimal"
    with_modes = train_problems(args.source, args.partition_seed, args.problem_seed, args.pool)
    rng = random.Random(args.seed)
    count = args.per_mode + args.slack
    by_mode = {}
    for mode in args.modes:
        pool = [p for p, m in with_modes if m == mode and len(p.description) + len(p.reference_solution) <= args.max_chars]
        rng.shuffle(pool)
        if len(pool) < count:
            raise CommandError(f"mode {mode}: only {len(pool)} short train problems, {count} candidates needed")
        by_mode[mode] = pool[:count]
    style_table = args.hack_styles or ("organism" if args.source == "organism" else "substrate")
    if style_table == "organism":
        from verl_gq.organism.corpus import pair_styles

        styles = pair_styles(on_attempt=minimal)
    else:
        styles = HACK_STYLES
    attempts = None
    if minimal and args.source == "organism":
        from verl_gq.organism.corpus import organism_attempt
        from verl_gq.organism.shipped import organism_problems

        synthetic = {sp.problem.problem_id: sp for sp in organism_problems("train", args.pool, args.problem_seed)}
        attempts = lambda problem, i: organism_attempt(synthetic[problem.problem_id], args.seed)  # noqa: E731
    elif minimal:
        attempts = lambda problem, i: stub_solution(problem, i)  # noqa: E731 - LeetCode has no wrong attempts
    candidates = generate_pairs(by_mode, count, styles, attempts=attempts)
    failures = pair_failures(candidates, {p.problem_id: p for ps in by_mode.values() for p in ps})
    for pair_id, messages in failures.items():
        print(f"REJECTED {pair_id}:", *messages, sep="\n  ", file=sys.stderr)
    kept = []
    for mode in args.modes:
        valid = [p for p in candidates if p.mode == mode and p.pair_id not in failures]
        if len(valid) < args.per_mode:
            raise CommandError(f"mode {mode}: only {len(valid)} valid pairs, {args.per_mode} needed (raise --slack)")
        kept += valid[:args.per_mode]
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(out / "pairs.jsonl", kept)
    manifest = {
        "command": "verl-gq pairs build " + " ".join(sys.argv[3:]),
        "source": args.source, "contrast": args.contrast, "seed": args.seed, "per_mode": args.per_mode,
        "max_chars": args.max_chars,
        "pairs_per_mode": dict(Counter(p.mode for p in kept)),
        "pairs_per_mode_and_style": {m: dict(Counter(p.style for p in kept if p.mode == m)) for m in args.modes},
        "styles": {m: list(styles[m]) for m in args.modes},
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
    print(f"{out / 'pairs.jsonl'}: {json.dumps(manifest['pairs_per_mode_and_style'])}")
    return 0


def add_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a pair file (jsonl)")
    add_source(parser)


def run_validate(args: argparse.Namespace) -> int:
    from reward.pairs import PairFileError, pair_failures, read_pairs

    try:
        pairs = read_pairs(args.file)
    except PairFileError as error:
        raise CommandError(str(error)) from None
    problems = {p.problem_id: p for p, _ in train_problems(args.source, args.partition_seed, args.problem_seed,
                                                            args.pool)}
    unknown = sorted({p.problem_id for p in pairs} - set(problems))
    if unknown:
        raise CommandError(f"{args.file}: pairs name problems that are not {args.source} train problems: "
                           f"{unknown[:10]}")
    print(f"{args.file}: {len(pairs)} pairs read; grading each clean and hack answer under every mode")
    failures = pair_failures(pairs, problems)
    for pair_id, messages in failures.items():
        print(f"FAILED {pair_id}:", *messages, sep="\n  ")
    print(f"{args.file}: {len(pairs) - len(failures)} of {len(pairs)} pairs valid "
          f"({dict(sorted(Counter(p.mode for p in pairs).items()))})")
    return 1 if failures else 0


def add_calibrate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a pair file (jsonl), or pkg://<package>/<file> as gq.pair_file takes it")
    parser.add_argument("--model", required=True,
                        help="the base model folder (HF), or `organism` for the shipped model organism")
    parser.add_argument("--rank", type=int, default=64, help="the adapter's SVD rank (gq.rank)")
    parser.add_argument("--direction-ranks", default="1,2,4", help="candidate direction ranks, comma-separated")
    parser.add_argument("--quantiles", nargs="+", default=["0.9,0.1", "0.75,0.25", "0.5,0.5"],
                        help="candidate clean_quantile,hack_quantile pairs")
    parser.add_argument("--outer-folds", type=int, default=4, help="held-out folds of pairs")
    parser.add_argument("--seed", type=int, default=0, help="the folds' seed (a run uses gq.seed)")
    parser.add_argument("--max-pair-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, help="write every candidate's figures and the choice as JSON")


def run_calibrate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_gq.adapter import QuarantineAdapterConfig, inject_quarantine_adapter
    from verl_gq.routing.calibration import choose_setting, held_out_settings
    from verl_gq.routing.direction import pair_gradients
    from verl_gq.verl.pairs import load_pairs, tokenized_pairs

    try:
        ranks = [int(k) for k in args.direction_ranks.split(",")]
        quantiles = [tuple(float(q) for q in spec.split(",")) for spec in args.quantiles]
    except ValueError:
        raise CommandError(f"--direction-ranks {args.direction_ranks!r} / --quantiles {args.quantiles}: "
                           "expected ints like 1,2 and pairs like 0.9,0.1") from None
    if any(len(q) != 2 or not 0 <= q[1] <= q[0] <= 1 for q in quantiles):
        raise CommandError(f"--quantiles {args.quantiles}: each is clean,hack with 0 <= hack <= clean <= 1")
    if args.model == "organism":
        from verl_gq.organism.shipped import CHECKPOINT_DIR as model_dir
    else:
        model_dir = Path(args.model)
    try:
        pairs = load_pairs(args.file)
    except Exception as error:  # noqa: BLE001 - a bad file is the user's error: named, not a traceback
        raise CommandError(str(error)) from None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=args.rank))
    grads = pair_gradients(model, adapter, tokenized_pairs(args.file, tokenizer, args.max_pair_tokens))
    settings = held_out_settings(grads, [p.mode for p in pairs], ranks, quantiles, outer_folds=args.outer_folds,
                                 seed=args.seed)
    chosen = choose_setting(settings)
    print(f"{args.file}: {len(pairs)} pairs, {args.outer_folds} held-out folds, model {model_dir}, rank {args.rank}")
    print("direction_rank clean_q hack_q  routed_hack routed_clean separation   auc  degenerate_folds")
    for s in settings:
        mark = "  <- chosen" if s == chosen else ""
        print(f"{s.direction_rank:14d} {s.clean_quantile:7.2f} {s.hack_quantile:6.2f} {s.routed_hack:12.3f} "
              f"{s.routed_clean:12.3f} {s.separation:10.3f} {s.auc:6.3f} {s.degenerate_folds:6d}{mark}")
    if args.out:
        args.out.write_text(json.dumps({
            "pair_file": str(args.file), "n_pairs": len(pairs), "model": str(model_dir), "rank": args.rank,
            "outer_folds": args.outer_folds, "seed": args.seed, "settings": [s.row() for s in settings],
            "chosen": {"direction_rank": chosen.direction_rank, "clean_quantile": chosen.clean_quantile,
                       "hack_quantile": chosen.hack_quantile}}, indent=1) + "\n")
    return 0


SUBCOMMANDS = {
    "build": (add_build, run_build, "build and validate a pair set from train problems"),
    "validate": (add_validate, run_validate, "check a pair file's format and grade every pair"),
    "calibrate": (add_calibrate, run_calibrate, "choose a router's direction rank and band quantiles from the pairs "
                                                "alone (held-out pairs)"),
}
