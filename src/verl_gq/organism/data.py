"""RL data for the model organism: verl parquet rows in exactly the LeetCode substrate's format (reward.dataset).

- Train: `organism_problems("train", n, seed)`, the grammar the shipped organism was trained on (its infer share,
  depth mix, input types), each problem under its own mode's hint (`SyntheticProblem.mode`, an even partition
  within each depth), default exploit names: the condition under which the organism exploits 3-6% of the time.
- Test: held-out problems (`eval` split: no signature in common with train), exactly `per_mode` per mode, so the
  deploy evaluation's per-mode rates rest on equal counts. They are drawn as `organism_problems("eval", 12c, seed)`
  with c = ceil(per_mode / 3) (c problems in each depth x mode cell), then each mode takes its problems depth by
  depth in turn: depths differ by at most one within a mode.
- Test small: `small_per_mode` test problems of each mode, its depths in turn: a balanced slice of test for CPU
  runs (recipes/organism_cpu.yaml).
- Test final: held-out problems drawn as test is, `final_per_mode` per mode (default 64: 256 prompts, x 16 samples =
  4096 a view): the last deploy evaluation's prompts (`gq.final_eval_file`), while the periodic ones use test.
- Each row also has a no-hint twin (`*_gt_only.parquet`, mode gt_only), as for LeetCode.

Rows come from `reward.dataset.assigned_rows` (`reward.prompts.build_messages`, the same `extra_info` keys,
data_source "leetcode_loophole"), so `reward.verl_entry.compute_score` grades them unchanged. Everything is
deterministic from (seed, n_train, per_mode) and the shipped manifest's grammar.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reward.dataset import SplitRows, assigned_rows
from reward.modes import MODES
from verl_gq.organism.problems import SyntheticProblem
from verl_gq.organism.shipped import CHECKPOINT_DIR, load_manifest, organism_problems

def _depths_in_turn(by_depth: Sequence[Sequence]) -> list:
    """Items of the depth groups taken d1, d2, d3, d1, ... (each group in its own order) until all are used."""
    return [group[k] for k in range(max(map(len, by_depth), default=0)) for group in by_depth if k < len(group)]


# infer-only pools are drawn this many times larger and filtered (about half of the grammar's problems are infer)
INFER_POOL_FACTOR = 4


def train_problems(n: int, seed: int, infer_only: bool = False) -> list[SyntheticProblem]:
    """n training problems of the organism's grammar (modes even within each depth, to within one); with
    `infer_only`, the first n infer problems ("infer the constants from the examples") of a larger draw."""
    if n < len(MODES):
        raise ValueError(f"n_train should be >= {len(MODES)} (one problem per mode), got {n}")
    if not infer_only:
        return organism_problems("train", n, seed)
    chosen = [sp for sp in organism_problems("train", INFER_POOL_FACTOR * n, seed) if sp.infer][:n]
    if len(chosen) < n:
        raise RuntimeError(f"{len(chosen)} infer problems among {INFER_POOL_FACTOR * n} drawn, {n} asked for")
    return chosen


def eval_problems(per_mode: int, seed: int, infer_only: bool = False) -> list[SyntheticProblem]:
    """Exactly per_mode held-out problems of each mode, balanced over depth within a mode (see module docstring),
    ordered by problem id; with `infer_only`, infer problems only (the first of each cell in a larger draw)."""
    if per_mode < 1:
        raise ValueError(f"per_mode should be >= 1, got {per_mode}")
    cells = -(-per_mode // 3)
    factor = INFER_POOL_FACTOR if infer_only else 1
    pool = [sp for sp in organism_problems("eval", 4 * 3 * cells * factor, seed) if sp.infer or not infer_only]
    chosen = []
    for mode in MODES:
        by_depth = [[sp for sp in pool if sp.mode == mode and sp.depth == d][:cells] for d in (1, 2, 3)]
        if any(len(group) != cells for group in by_depth):
            raise RuntimeError(f"mode {mode}: depth cells {[len(g) for g in by_depth]}, {cells} each expected")
        chosen += _depths_in_turn(by_depth)[:per_mode]
    return sorted(chosen, key=lambda sp: sp.problem.problem_id)


def rows(problems: Sequence[SyntheticProblem], split: str) -> SplitRows:
    """The parquet rows of one split: each problem under its own mode's hint, plus its no-hint twin."""
    return assigned_rows([sp.problem for sp in problems], [sp.mode for sp in problems], split)


@dataclass(frozen=True)
class OrganismData:
    problems: dict[str, list[SyntheticProblem]]  # parquet split -> problems, row order
    rows: dict[str, SplitRows]


def small_slice(problems: Sequence[SyntheticProblem], split_rows: SplitRows, per_mode: int) -> SplitRows:
    """A balanced slice of a split: per_mode problems of each mode, taking its depths in turn (d1, d2, d3, d1, ...;
    each depth in id order); row order and indices kept."""
    keep: set[int] = set()
    for mode in MODES:
        by_depth = [[i for i, sp in enumerate(problems) if sp.mode == mode and sp.depth == d] for d in (1, 2, 3)]
        turns = _depths_in_turn(by_depth)
        if len(turns) < per_mode:
            raise ValueError(f"mode {mode}: {len(turns)} problems, a slice of {per_mode} per mode asked for")
        keep.update(turns[:per_mode])
    order = sorted(keep)
    return SplitRows(hinted=[split_rows.hinted[i] for i in order], gt_only=[split_rows.gt_only[i] for i in order])


FINAL_PER_MODE = 64


def build(n_train: int, test_per_mode: int, seed: int, small_per_mode: int = 2, infer_only: bool = False,
          final_per_mode: int = FINAL_PER_MODE) -> OrganismData:
    """train, test, test_small and test_final (see module docstring); `infer_only` keeps infer problems only in every
    split."""
    if not 1 <= small_per_mode <= test_per_mode:
        raise ValueError(f"small_per_mode should be in [1, test_per_mode={test_per_mode}], got {small_per_mode}")
    problems = {"train": train_problems(n_train, seed, infer_only),
                "test": eval_problems(test_per_mode, seed, infer_only),
                "test_final": eval_problems(final_per_mode, seed, infer_only)}
    split_rows = {split: rows(ps, split) for split, ps in problems.items()}
    split_rows["test_small"] = small_slice(problems["test"], split_rows["test"], small_per_mode)
    by_id = {sp.problem.problem_id: sp for sp in problems["test"]}
    problems["test_small"] = [by_id[r["extra_info"]["problem_id"]] for r in split_rows["test_small"].hinted]
    return OrganismData(problems=problems, rows=split_rows)


def counts(problems: Sequence[SyntheticProblem]) -> dict:
    """Counts by mode and by depth, and the infer share: what the manifest records and tests check."""
    return {
        "n": len(problems),
        "by_mode": dict(sorted(Counter(sp.mode for sp in problems).items())),
        "by_depth": dict(sorted(Counter(f"d{sp.depth}" for sp in problems).items())),
        "infer_share": round(sum(sp.infer for sp in problems) / max(len(problems), 1), 4),
    }


def rows_sha256(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def prompt_tokens(rows: list[dict]) -> dict:
    """Prompt lengths in the organism's tokens, as verl renders them (chat template + generation prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(CHECKPOINT_DIR), local_files_only=True)
    lengths = sorted(len(tokenizer.apply_chat_template(list(r["prompt"]), add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]) for r in rows)
    return {"median": statistics.median(lengths), "p99": lengths[int(0.99 * (len(lengths) - 1))],
            "max": lengths[-1]}


def write(out: Path, n_train: int, test_per_mode: int, seed: int, small_per_mode: int = 2, token_stats: bool = True,
          command: str = "", infer_only: bool = False, final_per_mode: int = FINAL_PER_MODE) -> dict:
    """Write {train,test,test_small,test_final}[_gt_only].parquet and manifest.json into `out`; return the
    manifest."""
    import pandas as pd
    from tqdm import tqdm

    built = build(n_train, test_per_mode, seed, small_per_mode, infer_only, final_per_mode)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "command": command, "seed": seed, "n_train": n_train, "test_per_mode": test_per_mode,
        "small_per_mode": small_per_mode, "final_per_mode": final_per_mode, "infer_only": infer_only,
        "grammar": load_manifest()["corpus_config"]["grammar"],
        "splits": {"train": "verl_gq.organism.problems train split", "test": "verl_gq.organism.problems eval split",
                   "test_small": "small_per_mode test problems of each mode, its depths in turn",
                   "test_final": "final_per_mode eval-split problems of each mode, drawn as test is"},
        "counts": {}, "rows_sha256": {}, "prompt_tokens": {},
    }
    for split, split_rows in tqdm(built.rows.items(), desc=f"{out}: splits", unit="split", disable=None):
        for suffix, rows in (("", split_rows.hinted), ("_gt_only", split_rows.gt_only)):
            pd.DataFrame(rows).to_parquet(out / f"{split}{suffix}.parquet", index=False)
            manifest["rows_sha256"][f"{split}{suffix}"] = rows_sha256(rows)
        manifest["counts"][split] = counts(built.problems[split])
        if token_stats and split != "test_small":
            manifest["prompt_tokens"][split] = prompt_tokens(split_rows.hinted + split_rows.gt_only)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
