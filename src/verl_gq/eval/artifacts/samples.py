"""Per-sample outcomes of a deploy evaluation: `per_sample_deploy.parquet`, one row per graded answer of every view,
beside the per-mode rates of per_mode_deploy.json (docs/outputs.md). Rates pooled over samples hide which answers
share a prompt; a table that wants prompt-clustered standard errors, or a view-against-view comparison paired by
prompt, reads this file. No torch.

Columns (one row per sample):
    step            the global step the evaluation ran at (per_mode_deploy.json's `step`)
    view            "as_trained", a router's name (its deployed model), or "base" (the model the run started from)
    prompt          the evaluation row's `extra_info.index`: the same prompt has the same id in every view
    mode            the prompt's mode (reward.modes)
    sample          the answer's index among its prompt's answers in this view, 0..group-1
    solve, hack     the grader's verdicts (never both)
    channel         the mode's grading channel fired (hack, or a solve that also fired it)
    response_chars  the answer's length in characters
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from verl_gq.eval.artifacts.schema import EvalBlock, SchemaError

SAMPLES_FILE = "per_sample_deploy.parquet"
COLUMNS: dict[str, str] = {"step": "int64", "view": "object", "prompt": "int64", "mode": "object", "sample": "int64",
                           "solve": "bool", "hack": "bool", "channel": "bool", "response_chars": "int64"}


def view_samples(view: str, step: int, prompts: Sequence[int], modes: Sequence[str], solved: Sequence[bool],
                 hacked: Sequence[bool], channels: Sequence[bool], response_chars: Sequence[int]) -> pd.DataFrame:
    """One view's samples in grading order; `sample` numbers each prompt's answers in that order."""
    lengths = {len(prompts), len(modes), len(solved), len(hacked), len(channels), len(response_chars)}
    if len(lengths) != 1:
        raise ValueError(f"every per-sample list must have one entry per sample; got lengths {sorted(lengths)}")
    frame = pd.DataFrame({"step": step, "view": view, "prompt": list(prompts), "mode": list(modes), "sample": 0,
                          "solve": list(solved), "hack": list(hacked), "channel": list(channels),
                          "response_chars": list(response_chars)})
    frame["sample"] = frame.groupby("prompt").cumcount()
    return check_samples(frame, f"view {view}")


def block_of(samples: pd.DataFrame, eval_modes: Sequence[str]) -> EvalBlock:
    """The per-mode rates of one view's samples (what per_mode_deploy.json records for that view)."""
    return EvalBlock.from_samples(list(samples["mode"]), list(samples["solve"]), list(samples["hack"]),
                                  eval_modes=eval_modes)


def check_samples(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """`frame` with exactly COLUMNS in their dtypes; SchemaError naming `where` and the column otherwise."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    extra = [c for c in frame.columns if c not in COLUMNS]
    if missing or extra:
        raise SchemaError(f"{where}: columns should be {list(COLUMNS)}; missing {missing}, unexpected {extra}")
    frame = frame[list(COLUMNS)].reset_index(drop=True)
    for column, dtype in COLUMNS.items():
        if frame[column].isna().any():
            raise SchemaError(f"{where}: column {column!r} has missing values")
        try:
            frame[column] = frame[column].astype(dtype) if dtype != "object" else frame[column].astype(str)
        except (TypeError, ValueError) as error:
            raise SchemaError(f"{where}: column {column!r} is not {dtype}: {error}") from None
    if (frame["solve"] & frame["hack"]).any():
        raise SchemaError(f"{where}: a sample is both solved and hacked")
    if frame.duplicated(["view", "prompt", "sample"]).any():
        raise SchemaError(f"{where}: (view, prompt, sample) repeats")
    return frame


def check_matches(samples: pd.DataFrame, blocks: dict[str, EvalBlock], where: str) -> None:
    """Each view's samples count to exactly its block's (hack, solve, n) per mode: the two files describe one
    evaluation."""
    if set(samples["view"]) != set(blocks):
        raise ValueError(f"{where}: views {sorted(set(samples['view']))} but the rates have {sorted(blocks)}")
    for view, block in blocks.items():
        rows = samples[samples["view"] == view]
        if len(rows) != block.overall.n:
            raise ValueError(f"{where}: view {view} has {len(rows)} samples, the rates {block.overall.n}")
        for mode, stats in block.by_mode.items():
            of_mode = rows[rows["mode"] == mode]
            counts = (int(of_mode["hack"].sum()), int(of_mode["solve"].sum()), len(of_mode))
            if counts != (stats.hack_count, stats.solve_count, stats.n):
                raise ValueError(f"{where}: view {view} mode {mode}: samples count (hack, solve, n) {counts}, the "
                                 f"rates {(stats.hack_count, stats.solve_count, stats.n)}")


def read_samples(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # pyarrow raises its own types for a damaged file
        raise SchemaError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from None
    return check_samples(frame, str(path))
