"""The `verl-gq` command's subcommands, one module each: `add_arguments(parser)` declares its options and
`run(args) -> int` calls the product code (the logic lives in the package's layers, not here)."""


class CommandError(Exception):
    """A refusal a command reports as one line (input it cannot accept), with exit status 1."""
