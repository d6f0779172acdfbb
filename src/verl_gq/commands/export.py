"""Export a run's model for use outside verl-gq: a router's deployed model (its quarantine deleted) or the model as
trained, as a plain Hugging Face folder (merged weights, config, generation config, tokenizer: transformers and vLLM
load it as the base) or as a PEFT LoRA adapter on the base model (peft loads it), with verl_gq_export.json beside it.

    verl-gq export RUN_DIR --out DIR --format hf|peft [--router NAME | --as-trained] [--model PATH]

A run with one router exports its deployed model by default; a run with several needs --router (or --as-trained);
a run without routers (vanilla) has only the model as trained. The base model must be the one the run was trained on
(the knobs' basis fingerprints are checked). docs/outputs.md describes what each format holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verl_gq.export import FORMATS

    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (holds train.safetensors)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (new or empty)")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="hf: a merged Hugging Face model; peft: a LoRA adapter on the base model")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--router", metavar="NAME", help="export this router's deployed model (default: the run's one "
                      "router)")
    view.add_argument("--as-trained", action="store_true", help="export the model as trained (quarantines kept)")
    parser.add_argument("--model", metavar="PATH",
                        help="the base model's folder (default: the run's actor_rollout_ref.model.path)")
    parser.add_argument("--svd-device", metavar="DEVICE",
                        help="where the bases' SVDs run, e.g. cuda (default: the CPU, where the model is loaded)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from verl_gq.commands import CommandError
    from verl_gq.export import ExportError, export_run

    transformers_logging.disable_progress_bar()  # one line per stage is progress enough
    try:
        export_run(args.run_dir, args.out, args.format, router=args.router, as_trained=args.as_trained,
                   model=args.model, force=args.force, svd_device=args.svd_device, progress=print)
    except ExportError as error:
        raise CommandError(str(error)) from None
    return 0
