"""The installed `verl-gq` command: every command's --help, a clear error for an unknown one, and the start-up cost a
command pays only for itself (a command's module may import torch; `verl-gq --help` must not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from verl_gq.cli import COMMANDS

COMMAND = Path(sys.executable).parent / "verl-gq"  # the [project.scripts] entry of the installed package
SUBCOMMANDS = {"data": ("leetcode", "organism"), "pairs": ("build", "validate")}


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMAND), *arguments], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    assert COMMAND.is_file(), f"{COMMAND}: the package's console script is not installed"
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert f"    {name}" in done.stdout, f"{name} missing from:\n{done.stdout}"


@pytest.mark.parametrize("command", [*(c for c in COMMANDS if c not in SUBCOMMANDS),
                                     *(f"{c} {s}" for c, subs in SUBCOMMANDS.items() for s in subs)])
def test_every_command_has_help(command):
    done = run(*command.split(), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: verl-gq {command}"), done.stdout[:300]
    assert "--" in done.stdout.split("options:")[-1], f"no options documented:\n{done.stdout}"


def test_unknown_command_and_missing_option_are_usage_errors():
    done = run("trian")
    assert done.returncode == 2 and "invalid choice: 'trian'" in done.stderr, done.stderr
    done = run("data", "organism")
    assert done.returncode == 2 and "--out" in done.stderr, done.stderr


def test_help_imports_no_command_module():
    probe = ("import sys\nfrom verl_gq.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'verl', 'pandas') if m in sys.modules)\n"
             "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]
