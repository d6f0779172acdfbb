"""Build the organism: SFT corpus -> tokenizer + Qwen3 -> training -> sampled held-out answers (no grading).

Writes into --out: checkpoint/ (HF folder, bf16), eval_answers.jsonl.gz (one sampled answer a line, enough to
grade without the model) and train_report.json (configs, corpus stats and hash, training curve, timings).
Grade with scripts/organism_eval.py. The organism's recorded run (docs/organism.md) is:

    python scripts/organism_train.py --out out/organism --device cuda --workers 8 --train-seconds 250
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from reward.modes import MODES
from reward.prompts import build_messages
from verl_gq.organism.problems import GrammarConfig, generate_split
from verl_gq.organism.corpus import CorpusConfig, build_corpus, corpus_hash, corpus_stats, prompt_fingerprint
from verl_gq.models.sampling import sample_answers
from verl_gq.organism.evaluate import CONDITIONS, eval_items, item_record, render_prompts
from verl_gq.eval.artifacts.run_dir import source_commit
from verl_gq.organism.train import ModelConfig, TrainConfig, build_and_train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes building the corpus")
    ap.add_argument("--n-samples", type=int, default=CorpusConfig.n_samples)
    ap.add_argument("--exploit-shares", default=",".join(map(str, CorpusConfig.exploit_share_of_hinted)),
                    help=f"share of each mode's hinted prompts answered by an exploit demo, comma-separated, "
                         f"in the order {','.join(MODES)}")
    ap.add_argument("--infer-share", type=float, default=GrammarConfig.infer_share)
    ap.add_argument("--train-seconds", type=float, default=TrainConfig.train_seconds)
    ap.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--model", default="{}", help="JSON of ModelConfig fields to override, e.g. '{\"layers\": 2}'")
    ap.add_argument("--eval-problems", type=int, default=480)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--eval-batch-size", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--git-commit", default=None, help="recorded commit, for runs in a copy without .git")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.time()
    corpus_config = CorpusConfig(n_samples=args.n_samples, seed=args.seed, 
                                 exploit_share_of_hinted=tuple(float(x) for x in args.exploit_shares.split(",")),
                                 grammar=GrammarConfig(infer_share=args.infer_share))
    model_config = ModelConfig(**json.loads(args.model))
    train_config = TrainConfig(train_seconds=args.train_seconds, max_steps=args.max_steps,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    samples = build_corpus(corpus_config, build_messages, workers=args.workers)
    stats, data_hash = corpus_stats(samples), corpus_hash(samples)
    t_corpus = time.time() - t0
    log(f"corpus {len(samples)} samples in {t_corpus:.0f}s, hash {data_hash[:16]}, kinds {stats['kind']}")

    model, tokenizer, result = build_and_train(samples, model_config, train_config, args.device,
                                               out_dir=out / "checkpoint", log=log)
    log(f"trained {result.steps} steps, {result.epochs:.2f} epochs, {result.seconds:.0f}s, "
        f"loss {result.first_loss:.3f} -> {result.final_loss:.3f}")

    t1 = time.time()
    problems = generate_split("eval", args.eval_problems, args.eval_seed, corpus_config.grammar)
    items = eval_items(problems, CONDITIONS, seed=args.eval_seed)
    prompts = render_prompts(problems, items, tokenizer, build_messages)
    model.to(args.device, dtype=torch.float32)  # the saved bf16 weights, computed in fp32
    answers = sample_answers(model, tokenizer, prompts, args.temperature, args.max_new_tokens,
                             args.eval_batch_size, args.eval_seed, args.device)
    with gzip.open(out / "eval_answers.jsonl.gz", "wt") as f:
        for it, answer in zip(items, answers):
            f.write(json.dumps(item_record(problems, it, answer)) + "\n")
    t_sample = time.time() - t1
    log(f"sampled {len(answers)} answers in {t_sample:.0f}s")

    report = {
        "command": " ".join([os.path.basename(sys.executable), "scripts/organism_train.py"] + sys.argv[1:]),
        "git_commit": args.git_commit or source_commit() or "unknown",
        "seed": args.seed,
        "device": args.device,
        "corpus_config": corpus_config.to_dict(),
        "model_config": asdict(model_config),
        "train_config": asdict(train_config),
        "n_params": sum(p.numel() for p in model.parameters()),
        "data_hash": data_hash,
        "prompt_fingerprint": prompt_fingerprint(build_messages),
        "corpus_stats": stats,
        "corpus_seconds": t_corpus,
        "train": result.to_dict(),
        "eval": {"split": "eval", "n_problems": args.eval_problems, "eval_seed": args.eval_seed,
                 "conditions": dict(CONDITIONS), "temperature": args.temperature,
                 "max_new_tokens": args.max_new_tokens, "sample_seconds": t_sample},
        "total_seconds": time.time() - t0,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    log(f"done in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
