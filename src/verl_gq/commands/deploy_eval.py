"""Deploy evaluation of a saved run, outside verl: the base model plus the run's knobs, sampled as trained and
deployed without each router's quarantine on the evaluation split of every mode, graded by the substrate's graders.

    verl-gq deploy-eval RUN_DIR --eval-file data/leetcode/test.parquet [--n-prompts 64] [--group 16]
        [--temperature 0.7] [--max-new-tokens 1536] [--randomise-names] [--model PATH] [--device cuda]
        [--out FILE | --record | --base]

Writes a per_mode_deploy.json (docs/outputs.md) to --out, by default RUN_DIR/per_mode_deploy.standalone.json (the
trainer's own per_mode_deploy.json is left alone), and every graded answer beside it (--out's name with
.samples.parquet); with --record, as the run's own evaluation at its saved step (RUN_DIR/per_mode_deploy.json,
per_sample_deploy.parquet and an eval row in metrics.jsonl), for a run trained without an in-run evaluation.
The model defaults to the one in the run's resolved config; each router's held-out modes come from its
direction_modes. With --base it evaluates the model the run started from (adapter disabled) on the same prompts and
sampling instead, and writes {"base": block} to --out (default RUN_DIR/base_deploy.json).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verl_gq.eval.settings import DeploySettings

    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--eval-file", type=Path, required=True, help="verl parquet of the evaluation split")
    parser.add_argument("--model", help="base model folder (default: the run's actor_rollout_ref.model.path)")
    parser.add_argument("--n-prompts", type=int, default=DeploySettings.n_prompts)
    parser.add_argument("--group", type=int, default=DeploySettings.group)
    parser.add_argument("--temperature", type=float, default=DeploySettings.temperature)
    parser.add_argument("--max-new-tokens", type=int, default=DeploySettings.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=DeploySettings.batch_size)
    parser.add_argument("--randomise-names", action="store_true")
    parser.add_argument("--seed", type=int, default=DeploySettings.seed)
    parser.add_argument("--device", default=DeploySettings.device)
    parser.add_argument("--out", type=Path)
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--record", action="store_true",
                      help="record it as the run's evaluation at its saved step: per_mode_deploy.json and an eval "
                           "row in metrics.jsonl (what the trainer writes)")
    view.add_argument("--base", action="store_true",
                      help="evaluate the base model instead (adapter disabled, same prompts and sampling)")


def run(args: argparse.Namespace) -> int:
    from reward.modes import held_out_modes
    from verl_gq.commands import CommandError
    from verl_gq.eval.artifacts.run_dir import RunDir, deploy_evaluation, record_deploy_evaluation
    from verl_gq.eval.artifacts.schema import SchemaError, dump_json, parse_deploy
    from verl_gq.eval.deploy import AS_TRAINED, BASE, evaluate, view_blocks
    from verl_gq.eval.settings import DeploySettings
    from verl_gq.monitor.config import MonitorSpec

    run_dir = RunDir(args.run_dir)
    try:
        meta = run_dir.read_train_metadata()
    except (FileNotFoundError, SchemaError) as error:
        raise CommandError(str(error)) from None
    config = meta["resolved_config"]
    model = args.model or config["actor_rollout_ref"]["model"]["path"]
    gq = config["actor_rollout_ref"]["actor"]["fsdp_config"]["gq"]
    routers = gq.get("routers") or {}
    monitor = MonitorSpec.from_any(gq.get("monitor"))
    settings = DeploySettings(n_prompts=args.n_prompts, group=args.group, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, randomise_names=args.randomise_names,
                              seed=args.seed, batch_size=args.batch_size, device=args.device)
    if args.base:
        samples = evaluate(model, run_dir.train_file, args.eval_file, settings, step=meta["step"], views=[BASE])
        (block,) = view_blocks(samples).values()
        out = args.out or run_dir.path / "base_deploy.json"
        out.write_text(json.dumps({"base": asdict(block), "settings": asdict(settings), "model": model,
                                   "eval_file": str(args.eval_file)}, indent=1) + "\n")
        run_dir.write_deploy_samples(samples, out.with_suffix(".samples.parquet"))
        print(f"{out}: base hack {block.overall.hack:.3f} solve {block.overall.solve:.3f}")
        return 0
    samples = evaluate(model, run_dir.train_file, args.eval_file, settings, step=meta["step"])
    blocks = view_blocks(samples)
    held_out = {name: held_out_modes((routers.get(name) or {}).get("direction_modes")) for name in meta["routers"]}
    record = deploy_evaluation(run_dir, seed=meta["seed"], step=meta["step"], model=model, group=settings.group,
                               temperature=settings.temperature, names_randomised=settings.randomise_names,
                               as_trained=blocks[AS_TRAINED], deployed={r: blocks[r] for r in meta["routers"]},
                               held_out_modes=held_out, monitor=monitor.name if monitor is not None else None)
    if args.record:
        record_deploy_evaluation(run_dir, run_dir.open_metrics_log(resume_from_step=meta["step"]), record, samples)
        out = run_dir.deploy_file
    else:
        out = args.out or run_dir.path / "per_mode_deploy.standalone.json"
        out.write_text(dump_json(record) + "\n")
        run_dir.write_deploy_samples(samples, out.with_suffix(".samples.parquet"))
    parse_deploy(out.read_text(), str(out))  # what every reader will do
    views = {AS_TRAINED: record.as_trained, **{name: r.deployed for name, r in record.routers.items()}}
    print(f"{out}: " + "; ".join(f"{view} hack {block.overall.hack:.3f} solve {block.overall.solve:.3f}"
                                 for view, block in views.items()))
    return 0
