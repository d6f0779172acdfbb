"""The pair set the routers' directions come from: where `gq.pair_file` points, read, checked and tokenised."""

from __future__ import annotations

from pathlib import Path

from verl_gq.resolvers import PKG_PREFIX, package_path
from verl_gq.routing import Pair, tokenize_pairs


def resolve_pair_file(path: str) -> Path:
    """A pair file path, or `pkg://<package>/<file>` for a file shipped inside an installed package."""
    if path.startswith(PKG_PREFIX):
        resolved = package_path(path)
    else:
        resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"gq.pair_file={path!r}: no such file ({resolved})")
    return resolved


def load_pairs(path: str) -> list:
    """Every pair of a pair file (reward.pairs jsonl), all modes: each router takes its own modes' pairs."""
    from reward.pairs import read_pairs

    return read_pairs(resolve_pair_file(path))


def tokenized_pairs(path: str, tokenizer, max_tokens: int) -> list[Pair]:
    """The pair file's pairs as token ids, as the run will see their completions."""
    return tokenize_pairs(load_pairs(path), tokenizer, max_tokens)
