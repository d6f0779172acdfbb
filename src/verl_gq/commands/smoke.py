"""A first check of an install: a tiny random Qwen3 and a toy arithmetic task (verl_gq/verl/smoke_task.py), then,
with --train, 2 GRPO steps of plain verl on the CPU through main_ppo (recipes/smoke_cpu.yaml: the plugin's CPU
platform and hf rollout, verl's own FSDP engine), about a minute on 2 cores.

    verl-gq smoke DIR [--train]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="where the model and parquet files go (DIR/model, DIR/*.parquet)")
    parser.add_argument("--train", action="store_true", help="then train 2 steps on the CPU (VERL_PLATFORM=cpu)")


def run(args: argparse.Namespace) -> int:
    from verl_gq.verl.smoke_task import prepare

    print(f"smoke assets written to {prepare(args.dir)}")
    if not args.train:
        return 0
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_GQ_SMOKE_DIR": str(args.dir.resolve()), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # an empty value makes Ray refuse the logical GPU
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=recipes/smoke_cpu.yaml",
               f"trainer.default_local_dir={args.dir.resolve() / 'checkpoints'}"]
    print(" ".join(command))
    return subprocess.run(command, env=env, cwd=args.dir).returncode
