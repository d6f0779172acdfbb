"""Benchmarks and development scripts use the package's public interfaces only: no import of a private (underscore)
module or name of verl_gq or reward, no access to an underscore attribute (which is how a script would patch or reach
into an engine's internals). Checked on the syntax tree of every file of benchmarks/ and scripts/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")])
PACKAGES = ("verl_gq", "reward")
STDLIB_PUBLIC = {("os", "_exit"), ("sys", "_getframe")}  # documented functions with an underscore name


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            parts = [*node.module.split("."), *(alias.name for alias in node.names)]
            found += [f"line {node.lineno}: from {node.module} import {p}" for p in parts if private(p)]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PACKAGES and any(map(private, a.name.split(".")))]
        elif isinstance(node, ast.Attribute) and private(node.attr) and not (
                isinstance(node.value, ast.Name) and (node.value.id, node.attr) in STDLIB_PUBLIC):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_uses_public_names_only(path):
    assert not violations(ast.parse(path.read_text(), filename=str(path))), violations(ast.parse(path.read_text()))


def test_the_check_sees_each_kind_of_private_use():
    source = ("from verl_gq.verl.engine import _segments_of\nimport reward._harness\n"
              "from reward import _canonical\nengine._apply_stash = None\n")
    assert len(violations(ast.parse(source))) == 4
