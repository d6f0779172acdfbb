"""`verl-gq`: the command for what users do around training (training itself is verl's main_ppo with a recipe).

    verl-gq data leetcode --out data/leetcode          verl parquet files of the LeetCode loophole substrate
    verl-gq data organism --out data/organism          the model organism's parquet files
    verl-gq pairs build|validate|calibrate ...         the clean/hack pair set the routers' directions come from
    verl-gq deploy-eval RUN_DIR --eval-file FILE       a saved run's deploy evaluation, outside verl
    verl-gq report RUNS_DIR                            every table and figure from a folder of runs
    verl-gq export RUN_DIR --out DIR --format hf|peft  a router's deployed model for transformers, vLLM or peft
    verl-gq smoke DIR [--train]                        a tiny model and task: a first check of an install

`verl-gq <command> --help` gives each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from verl_gq.commands import CommandError

# command -> (module of verl_gq.commands, one-line help); a module with SUBCOMMANDS has its own subcommands
COMMANDS = {
    "data": ("data", "build verl parquet files: the LeetCode substrate or the model organism"),
    "pairs": ("pairs", "build, validate or calibrate on a clean/hack pair set"),
    "deploy-eval": ("deploy_eval", "evaluate a saved run as trained and deployed without each router's quarantine"),
    "report": ("report", "tables and figures from a folder of run folders"),
    "export": ("export", "export a router's deployed model as a Hugging Face folder or a PEFT LoRA adapter"),
    "smoke": ("smoke", "write a tiny model and task (and train it 2 steps on CPU): a first check of an install"),
}


def parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The command line; only the `selected` command's module is imported and given its options (a command's module
    may import torch or transformers, seconds that `verl-gq --help` or another command should not pay)."""
    top = argparse.ArgumentParser(prog="verl-gq", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != selected:
            continue
        module = importlib.import_module(f"verl_gq.commands.{module_name}")
        command.description = module.__doc__
        subcommands = getattr(module, "SUBCOMMANDS", None)
        if subcommands is None:
            module.add_arguments(command)
            command.set_defaults(run=module.run)
            continue
        nested = command.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
        for sub_name, (add_arguments, run, sub_help) in subcommands.items():
            sub = nested.add_parser(sub_name, help=sub_help, description=sub_help)
            add_arguments(sub)
            sub.set_defaults(run=run)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = parser(selected).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CommandError as error:
        print(f"verl-gq {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
