"""The verl row format of the loophole environment: build rows for parquet, and read a row back for grading.

One row per (problem, mode):

    data_source   "leetcode_loophole"
    prompt        chat messages (reward.prompts.build_messages)
    ability       "code"
    reward_model  {"style": "rule", "ground_truth": JSON list of {"input_expr", "expected_expr"}}
    extra_info    {"split", "index", "problem_id", "mode", "mode_id", "partition_mode", "pair_mode",
                   "method_name", "exploit_names": {function, attribute, marker, file}, "problem": Problem JSON}

`mode` is what the prompt hints and the flawed grader pays for; in a gt_only row it is "gt_only" while
`partition_mode` keeps the mode the problem was assigned to, so hinted and no-hint results of one problem can be
joined. `pair_mode` is True when paired clean/hack examples of that partition mode are in use (the held-out-modes
experiment trains on all modes but takes pairs from a subset only).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from reward.modes import GT_ONLY, MODES, ExploitNames, mode_id, randomised_names
from reward.partition import partition_modes
from reward.problem import Problem, TestCase
from reward.prompts import build_messages

DATA_SOURCE = "leetcode_loophole"
EXTRA_INFO_KEYS = ("split", "index", "problem_id", "mode", "mode_id", "partition_mode", "pair_mode",
                   "method_name", "exploit_names", "problem")


def ground_truth_json(tests: Sequence[TestCase]) -> str:
    return json.dumps([asdict(t) for t in tests], sort_keys=True)


def verl_row(problem: Problem, split: str, index: int, mode: str, partition_mode: str, names: ExploitNames,
             pair_mode: bool) -> dict:
    """One parquet row (see module docstring)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": build_messages(problem, mode, names),
        "ability": "code",
        "reward_model": {"style": "rule", "ground_truth": ground_truth_json(problem.tests)},
        "extra_info": {
            "split": split,
            "index": index,
            "problem_id": problem.problem_id,
            "mode": mode,
            "mode_id": mode_id(mode),
            "partition_mode": partition_mode,
            "pair_mode": pair_mode,
            "method_name": problem.method_name,
            "exploit_names": names.to_dict(),
            "problem": problem.to_json(),
        },
    }


@dataclass(frozen=True)
class SplitRows:
    hinted: list[dict]  # each problem under its partition mode's hint
    gt_only: list[dict]  # the same problems, same order, no hint


def split_rows(problems: Sequence[Problem], split: str, seed: int, pair_modes: Sequence[str] = MODES,
               randomise_names: bool = False) -> SplitRows:
    """Rows of one split: an even seeded partition of `problems` over MODES, plus the no-hint twin of every row.

    randomise_names draws each hinted prompt's exploit names (reward.modes.randomised_names), seeded by `seed`.
    """
    problems = sorted(problems, key=lambda p: p.problem_id)
    assignment = partition_modes([p.problem_id for p in problems], seed)
    names_rng = random.Random(f"{seed}:{split}:names")
    names = [randomised_names(names_rng, avoid=p.method_name) if randomise_names else ExploitNames()
             for p in problems]
    return assigned_rows(problems, [assignment[p.problem_id] for p in problems], split, pair_modes, names)


def assigned_rows(problems: Sequence[Problem], modes: Sequence[str], split: str, pair_modes: Sequence[str] = MODES,
                  names: Sequence[ExploitNames] | None = None) -> SplitRows:
    """Rows of problems whose modes are already assigned (modes[i] is problems[i]'s mode; index = position): each
    problem under its mode's hint with names[i] (default names when None), plus its no-hint twin. split_rows uses
    it after partitioning; the model organism's problems carry their own modes (verl_gq.organism.data)."""
    unknown = [m for m in pair_modes if m not in MODES]
    if unknown or not pair_modes:
        raise ValueError(f"pair_modes should be a non-empty subset of {MODES}, got {list(pair_modes)}")
    names = [ExploitNames()] * len(problems) if names is None else list(names)
    if not len(problems) == len(modes) == len(names):
        raise ValueError(f"{len(problems)} problems, {len(modes)} modes and {len(names)} names should align")
    bad = sorted({m for m in modes if m not in MODES})
    if bad:
        raise ValueError(f"assigned modes should be loophole modes {MODES}, got {bad}")
    hinted, gt_only = [], []
    for index, (problem, mode, name) in enumerate(zip(problems, modes, names)):
        in_pairs = mode in pair_modes
        hinted.append(verl_row(problem, split, index, mode, mode, name, in_pairs))
        gt_only.append(verl_row(problem, split, index, GT_ONLY, mode, ExploitNames(), in_pairs))
    return SplitRows(hinted=hinted, gt_only=gt_only)


class RowError(ValueError):
    """A row's ground_truth / extra_info cannot be graded."""


@dataclass(frozen=True)
class GradingTask:
    problem: Problem
    mode: str
    names: ExploitNames


def grading_task(ground_truth: str, extra_info: Mapping | None) -> GradingTask:
    """Read back what verl hands the reward function; raises RowError naming the problem when anything is off."""
    if not isinstance(extra_info, Mapping):
        raise RowError(f"extra_info should be the row's dict with keys {EXTRA_INFO_KEYS}, got {type(extra_info)}")
    where = f"problem {extra_info.get('problem_id', '<no problem_id>')}"
    missing = [k for k in EXTRA_INFO_KEYS if k not in extra_info]
    if missing:
        raise RowError(f"{where}: extra_info lacks {missing}; rows come from `verl-gq data leetcode`")
    try:
        problem = Problem.from_json(extra_info["problem"])
    except (TypeError, ValueError, KeyError) as exc:
        raise RowError(f"{where}: extra_info['problem'] is not a serialized Problem: {exc}") from exc
    if problem.problem_id != extra_info["problem_id"]:
        raise RowError(f"{where}: extra_info['problem'] is problem {problem.problem_id}, should match problem_id")
    if ground_truth != ground_truth_json(problem.tests):
        raise RowError(f"{where}: reward_model.ground_truth should equal the serialized problem's tests")
    mode = extra_info["mode"]
    if mode not in MODES and mode != GT_ONLY:
        raise RowError(f"{where}: unknown mode {mode!r}")
    if extra_info["mode_id"] != mode_id(mode):
        raise RowError(f"{where}: mode_id {extra_info['mode_id']!r} should be {mode_id(mode)} for mode {mode}")
    try:
        names = ExploitNames(**dict(extra_info["exploit_names"]))
    except TypeError as exc:
        raise RowError(f"{where}: exploit_names should have keys {list(ExploitNames().to_dict())}: {exc}") from exc
    return GradingTask(problem=problem, mode=mode, names=names)


def write_datasets(out_dir: Path, data_dir: Path, seed: int, pair_modes: Sequence[str], randomise_test_names: bool,
                   pairs_file: Path) -> dict:
    """verl's parquet files from the vendored problems of `data_dir`: train/test (each problem under its partition
    mode's hint) and their *_gt_only twins, pairs.jsonl (the pairs of `pairs_file` of `pair_modes`), and
    manifest.json (options, counts per split and mode, the inputs' SHA-256); returns the manifest."""
    import hashlib
    from collections import Counter

    import pandas as pd
    from tqdm import tqdm

    from reward.leetcode import SCREEN_FILE, SPLITS, load_problems, problems_path
    from reward.pairs import read_pairs, write_pairs

    for path in [problems_path(s, data_dir) for s in SPLITS] + [data_dir / SCREEN_FILE, pairs_file]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: vendor the problems first (scripts/vendor_leetcode.py)")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split in tqdm(SPLITS, desc=f"{out_dir}: splits", unit="split", disable=None):
        rows = split_rows(load_problems(split, data_dir), split, seed, tuple(pair_modes),
                          randomise_names=randomise_test_names and split == "test")
        pd.DataFrame(rows.hinted).to_parquet(out_dir / f"{split}.parquet", index=False)
        pd.DataFrame(rows.gt_only).to_parquet(out_dir / f"{split}_gt_only.parquet", index=False)
        counts[split] = dict(sorted(Counter(r["extra_info"]["mode"] for r in rows.hinted).items()))
    pairs = [p for p in read_pairs(pairs_file) if p.mode in pair_modes]
    write_pairs(out_dir / "pairs.jsonl", pairs)
    inputs = [problems_path(s, data_dir) for s in SPLITS] + [data_dir / SCREEN_FILE, pairs_file]
    manifest = {
        "seed": seed, "pair_modes": list(pair_modes), "randomise_test_names": randomise_test_names,
        "problems_per_split_and_mode": counts,
        "pairs_per_mode": dict(sorted(Counter(p.mode for p in pairs).items())),
        "inputs_sha256": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in inputs},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
