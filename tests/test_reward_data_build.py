"""`verl-gq data leetcode`, run as a command: the verl parquet files, their gt_only twins, held-out pair modes,
randomised evaluation names, and clear errors on bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from reward.dataset import DATA_SOURCE, ground_truth_json, grading_task
from reward.leetcode import load_problems
from reward.modes import GT_ONLY, MODES, ExploitNames, mode_id
from reward.prompts import build_messages

def run_build(out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verl_gq.cli", "data", "leetcode", "--out", str(out), *options],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("leetcode_verl")
    result = run_build(out, "--seed", "0", "--pair-modes", "run_tests,sentinel", "--randomise-test-names")
    assert result.returncode == 0, result.stderr
    return out


def test_every_kept_problem_has_one_hinted_row_and_a_gt_only_twin(built):
    for split in ("train", "test"):
        hinted = pd.read_parquet(built / f"{split}.parquet")
        twin = pd.read_parquet(built / f"{split}_gt_only.parquet")
        kept = {p.problem_id: p for p in load_problems(split)}
        ids = [info["problem_id"] for info in hinted["extra_info"]]
        assert sorted(ids) == sorted(kept) and len(set(ids)) == len(ids), f"{split}: one row per kept problem"
        assert [info["problem_id"] for info in twin["extra_info"]] == ids, "gt_only twin should keep the order"
        counts = Counter(info["mode"] for info in hinted["extra_info"])
        assert set(counts) == set(MODES) and max(counts.values()) - min(counts.values()) <= 1, counts
        for (_, row), (_, twin_row) in zip(hinted.iterrows(), twin.iterrows()):
            info, twin_info = row["extra_info"], twin_row["extra_info"]
            problem = kept[info["problem_id"]]
            assert row["data_source"] == DATA_SOURCE and row["ability"] == "code"
            assert row["reward_model"]["style"] == "rule"
            assert row["reward_model"]["ground_truth"] == ground_truth_json(problem.tests)
            assert info["mode_id"] == mode_id(info["mode"]) and info["partition_mode"] == info["mode"]
            assert info["pair_mode"] == (info["mode"] in ("run_tests", "sentinel"))
            names = ExploitNames(**info["exploit_names"])
            assert list(row["prompt"]) == build_messages(problem, info["mode"], names)
            assert twin_info["mode"] == GT_ONLY and twin_info["partition_mode"] == info["mode"]
            assert list(twin_row["prompt"]) == build_messages(problem, GT_ONLY), "twin prompt should carry no hint"
            task = grading_task(row["reward_model"]["ground_truth"], dict(info))
            assert task.problem == problem and task.mode == info["mode"] and task.names == names


def test_names_are_randomised_on_test_only_and_deterministically(built, tmp_path):
    train_names = {json.dumps(dict(i["exploit_names"])) for i in pd.read_parquet(built / "train.parquet")["extra_info"]}
    test_names = [dict(i["exploit_names"]) for i in pd.read_parquet(built / "test.parquet")["extra_info"]]
    assert train_names == {json.dumps(ExploitNames().to_dict())}, "training prompts should use the default names"
    assert len({n["function"] for n in test_names}) > 3, "test prompts should draw varied names"
    again = run_build(tmp_path, "--seed", "0", "--pair-modes", "run_tests,sentinel", "--randomise-test-names")
    assert again.returncode == 0, again.stderr
    for name in ("train.parquet", "test.parquet", "train_gt_only.parquet", "test_gt_only.parquet", "pairs.jsonl"):
        assert pd.read_parquet(tmp_path / name).equals(pd.read_parquet(built / name)) if name.endswith("parquet") \
            else (tmp_path / name).read_text() == (built / name).read_text(), f"{name} should be deterministic"


def test_held_out_modes_keep_pairs_of_the_named_modes_only(built):
    modes = {json.loads(line)["mode"] for line in (built / "pairs.jsonl").read_text().splitlines()}
    assert modes == {"run_tests", "sentinel"}, "pairs.jsonl should hold pairs of --pair-modes only"
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["pair_modes"] == ["run_tests", "sentinel"] and manifest["randomise_test_names"] is True


@pytest.mark.parametrize("options, message, status", [
    (("--pair-modes", "run_tests,telepathy"), "should be distinct modes from", 2),  # a bad argument: argparse's 2
    (("--pair-modes", ""), "should be distinct modes from", 2),
    (("--data-dir", "/nonexistent"), "/nonexistent/problems-train.jsonl.gz is missing", 1),  # a refusal: 1
])
def test_bad_options_fail_with_a_clear_message(tmp_path, options, message, status):
    result = run_build(tmp_path, *options)
    assert result.returncode == status and message in result.stderr, result.stderr


def test_verl_rlhf_dataset_reads_the_rows_back_into_gradable_tasks(built):
    """What the trainer does with the file: verl's RLHFDataset loads it; its items must grade as written."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from verl_gq.models import tiny_corpus, train_tokenizer

    config = OmegaConf.create({"max_prompt_length": 100_000, "filter_overlong_prompts": False,
                               "prompt_key": "prompt", "return_raw_chat": True})
    dataset = RLHFDataset(data_files=[str(built / "test.parquet")], tokenizer=train_tokenizer(tiny_corpus(), 512),
                          config=config)
    kept = {p.problem_id: p for p in load_problems("test")}
    assert len(dataset) == len(kept)
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        assert item["data_source"] == DATA_SOURCE
        task = grading_task(item["reward_model"]["ground_truth"], item["extra_info"])
        assert task.problem == kept[item["extra_info"]["problem_id"]]
        assert item["raw_prompt"] == build_messages(task.problem, task.mode, task.names)
