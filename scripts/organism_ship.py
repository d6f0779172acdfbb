"""Ship a trained, graded organism run into verl_gq/organism/checkpoint/ with its manifest.json.

Copies <run>/checkpoint (HF folder), then writes manifest.json from <run>/train_report.json and
<run>/base_figures.json (scripts/organism_eval.py) plus the CPU check recomputed here on the copied folder
(verl_gq.organism.shipped.cpu_check), which tests/test_organism_checkpoint.py reproduces.

    python scripts/organism_ship.py out/organism
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from verl_gq.organism.shipped import CHECKPOINT_DIR, MANIFEST, cpu_check, file_sha256, load_organism

MAX_FILE_BYTES = 16 * 1024 * 1024  # the size budget of every file the repository ships
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")
# Greedy CPU answers may flip at near-ties on another CPU; the counts (out of n_problems) must stay this close.
CPU_CHECK_COUNT_TOLERANCE = 2
CPU_CHECK_LOSS_TOLERANCE = 0.01


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--dest", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--note", default="", help="free text recorded in the manifest (e.g. why this run)")
    args = ap.parse_args(argv)
    report = json.loads((args.run / "train_report.json").read_text())
    figures = json.loads((args.run / "base_figures.json").read_text())
    source = args.run / "checkpoint"
    missing = [f for f in SHIPPED_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {missing}: is it an organism_train.py checkpoint?")
    for f in SHIPPED_FILES:
        if (source / f).stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{source / f} is over 16 MiB: shard it (save_pretrained(max_shard_size=...))")
    args.dest.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED_FILES:
        shutil.copyfile(source / f, args.dest / f)

    t0 = time.time()
    model, tokenizer = load_organism(args.dest)
    check = cpu_check(model, tokenizer)
    check.update(seconds=time.time() - t0, count_tolerance=CPU_CHECK_COUNT_TOLERANCE,
                 loss_tolerance=CPU_CHECK_LOSS_TOLERANCE, device="cpu", dtype="float32", decoding="greedy")

    manifest = {
        "what": "model organism for reward hacking: Qwen3 trained from scratch by SFT on synthetic problems",
        "note": args.note,
        "train_command": report["command"],
        "eval_command": f"python scripts/organism_eval.py {args.run}",
        "ship_command": " ".join(["python", "scripts/organism_ship.py"] + (argv if argv is not None else sys.argv[1:])),
        "seed": report["seed"],
        "git_commit": report["git_commit"],
        "device": report["device"],
        "data_hash": report["data_hash"],
        "prompt_fingerprint": report["prompt_fingerprint"],
        "corpus_config": report["corpus_config"],
        "corpus_stats": report["corpus_stats"],
        "model_config": report["model_config"],
        "n_params": report["n_params"],
        "train_config": report["train_config"],
        "train": {k: v for k, v in report["train"].items() if k != "losses"},
        "loss_curve": report["train"]["losses"],
        "timings_seconds": {"corpus": report["corpus_seconds"], "train": report["train"]["seconds"],
                            "sample_eval": report["eval"]["sample_seconds"], "total": report["total_seconds"]},
        "eval": report["eval"],
        "base_figures": figures,
        "files": {f: {"bytes": (args.dest / f).stat().st_size, "sha256": file_sha256(args.dest / f)}
                  for f in SHIPPED_FILES},
        "cpu_check": check,
    }
    (args.dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({"cpu_check": check, "total_bytes": sum(v["bytes"] for v in manifest["files"].values())},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
