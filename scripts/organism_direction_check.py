"""Does a pair set's hack direction single out the organism's OWN exploits? The check behind the organism recipes'
pair set and band (recipes/organism.yaml; docs/organism.md, "Study"). CPU, about 5 minutes on 2 cores.

    python scripts/organism_direction_check.py [--pairs organism substrate PATH...] [--problems 128] [--samples 4]

1. Sample the shipped organism (T = 0.7, top-k/top-p off) on hinted prompts of --problems TRAIN problems drawn with
   --problem-seed (not the pair set's draw), --samples answers each, and grade them with reward.grader: hack
   (channel fired, oracle failed), solve, or wrong.
2. Knob gradients of log p(answer) for every answer (the adapter at rank 64, knobs at zero: the state at step 1),
   the direction a rollout's GRPO update takes when reinforced (A > 0) or its negative (A < 0).
3. For each pair set: pair gradients, the live direction (route2b's extract_direction, k directions) and the
   cross-fitted band at each (clean, hack) quantile pair (route2b's calibrate_band, fold seed --fold-seed).
   Reported: mean cosine of each kind of answer, AUC(hack > solve) and AUC(hack > -wrong), and the band's mean
   routed weight of hack (A > 0), solve (A > 0) and wrong (A < 0) answers.

Pair sets: `organism` (the shipped verl_gq/organism/pairs: the organism's own exploit forms), `substrate` (the
same problems, prompts and clean answers with the hack rebuilt in reward.pairs.HACK_STYLES), or a pairs.jsonl path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from reward.grader import grade_batch
from reward.modes import ExploitNames
from reward.pairs import HACK_STYLES, fenced, hack_program, read_pairs
from reward.prompts import build_messages
from verl_gq.adapter import QuarantineAdapterConfig, inject_quarantine_adapter
from verl_gq.models.sampling import sample_answers
from verl_gq.organism.shipped import ORGANISM_PAIRS, load_organism, organism_problems
from verl_gq.organism.train import prompt_text
from verl_gq.routing.band import assign_folds, calibrate_band
from verl_gq.routing.direction import (PairGradients, completion_log_prob_gradients, direction_scores,
                                       extract_direction, pair_gradients)
from verl_gq.routing import tokenize_pairs



def load_pair_set(spec: str) -> list:
    if spec == "organism":
        return read_pairs(ORGANISM_PAIRS)
    if spec == "substrate":
        manifest = json.loads((ORGANISM_PAIRS.parent / "manifest.json").read_text())
        problems = {sp.problem.problem_id: sp.problem
                    for sp in organism_problems("train", manifest["pool"], manifest["problem_seed"])}
        out = []
        for i, pair in enumerate(read_pairs(ORGANISM_PAIRS)):
            styles = list(HACK_STYLES[pair.mode])
            style = styles[i % len(styles)]
            hack = fenced(hack_program(problems[pair.problem_id], pair.mode, style, pair.names, i // len(styles)))
            out.append(dataclasses.replace(pair, style=style, hack=hack))
        return out
    return read_pairs(spec)


def auc(high: torch.Tensor, low: torch.Tensor) -> float:
    return float((high[:, None] > low[None, :]).double().mean()) if len(high) and len(low) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["organism", "substrate"])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--problem-seed", type=int, default=7)
    parser.add_argument("--sample-seed", type=int, default=3)
    parser.add_argument("--fold-seed", type=int, default=41)
    parser.add_argument("--direction-ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quantiles", nargs="+", default=["0.9,0.1", "0.75,0.25", "0.5,0.5"],
                        help="clean_quantile,hack_quantile pairs")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # calibrate_band warns on every degenerate band; the table shows them
    torch.manual_seed(0)

    started = time.time()
    model, tokenizer = load_organism()
    problems = organism_problems("train", args.problems * 16, args.problem_seed)[::16]
    prompts = [prompt_text(tokenizer, build_messages(sp.problem, sp.mode)) for sp in problems
               for _ in range(args.samples)]
    answers = sample_answers(model, tokenizer, prompts, temperature=0.7, max_new_tokens=128, batch_size=64,
                             seed=args.sample_seed, device="cpu")
    owners = [sp for sp in problems for _ in range(args.samples)]
    verdicts = grade_batch([(sp.problem, a, sp.mode, ExploitNames()) for sp, a in zip(owners, answers)])
    hack = torch.tensor([bool(v.hack) for v in verdicts])
    solve = torch.tensor([bool(v.solve) for v in verdicts])
    wrong = ~hack & ~solve
    print(f"{len(answers)} answers: solve {int(solve.sum())}, hack {int(hack.sum())}, wrong {int(wrong.sum())} "
          f"({time.time() - started:.0f} s)", flush=True)

    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=64))
    eos = tokenizer.eos_token_id
    sequences = [(tokenizer(p, add_special_tokens=False)["input_ids"],
                  tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]) for p, a in zip(prompts, answers)]
    live = completion_log_prob_gradients(model, adapter, sequences, micro_batch_size=8)

    results = {"answers": {"n": len(answers), "solve": int(solve.sum()), "hack": int(hack.sum())}, "pair_sets": {}}
    for spec in args.pairs:
        pairs = load_pair_set(spec)
        grads: PairGradients = pair_gradients(model, adapter, tokenize_pairs(pairs, tokenizer, 4096))
        folds = assign_folds([p.mode for p in pairs], 2, args.fold_seed)
        for k in args.direction_ranks:
            scores = direction_scores(live, extract_direction(grads, k)).double()
            row = {"cos": {"hack": float(scores[hack].mean()), "solve": float(scores[solve].mean()),
                           "wrong": float(scores[wrong].mean())},
                   "auc_hack_over_solve": auc(scores[hack], scores[solve]),
                   "auc_hack_over_neg_wrong": auc(scores[hack], -scores[wrong]), "bands": {}}
            print(f"{spec:10s} k={k}: cos hack {row['cos']['hack']:+.3f} solve {row['cos']['solve']:+.3f} "
                  f"wrong {row['cos']['wrong']:+.3f}; AUC hack>solve {row['auc_hack_over_solve']:.2f}, "
                  f"hack>-wrong {row['auc_hack_over_neg_wrong']:.2f}")
            for spec_q in args.quantiles:
                clean_q, hack_q = (float(x) for x in spec_q.split(","))
                band = calibrate_band(grads, folds, lambda g: extract_direction(g, k), clean_q, hack_q).band
                routed = {"hack": float(band.weights(scores[hack]).mean()),
                          "solve": float(band.weights(scores[solve]).mean()),
                          "wrong": float(band.weights(-scores[wrong]).mean())}
                row["bands"][spec_q] = {"lower": band.lower, "upper": band.upper, "degenerate": band.degenerate,
                                        "routed": routed}
                print(f"    quantiles {spec_q:9s} band [{band.lower:+.3f}, {band.upper:+.3f}]"
                      f"{' degenerate' if band.degenerate else ''}: routed hack {routed['hack']:.2f}, "
                      f"solve {routed['solve']:.2f}, wrong(A<0) {routed['wrong']:.2f}")
            results["pair_sets"].setdefault(spec, {})[f"k{k}"] = row
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
