"""The toy task recipes/smoke_cpu.yaml trains on: one-digit arithmetic chats, and their reward.

It exists to exercise verl end to end on a tiny random model, where the LeetCode substrate's reward would be zero
for every sample (and GRPO advantages with it). The reward is honest and dense: 1.0 when the response contains the
right number, otherwise half the share of digit characters in the response (a signal a random model can climb).

    verl-gq smoke OUT_DIR [--train]   # writes OUT_DIR/model (tiny Qwen3), train.parquet, val.parquet
    python -m verl_gq.verl.smoke_task OUT_DIR   # the same files, without the command
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Any, Optional

import verl_gq.verl.plugin  # noqa: F401 - verl loads this file by path: surface a broken plugin here too

DATA_SOURCE = "verl_gq_smoke_arithmetic"


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Optional[dict] = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl custom reward (reward.custom_reward_function): score plus the two parts it is made of."""
    if data_source != DATA_SOURCE:
        raise ValueError(f"smoke reward scores {DATA_SOURCE!r} rows only, got data_source={data_source!r}")
    exact = float(re.search(rf"(?<!\d){re.escape(str(ground_truth))}(?!\d)", solution_str) is not None)
    digit_share = sum(c.isdigit() for c in solution_str) / max(1, len(solution_str))
    return {"score": exact if exact else 0.5 * digit_share, "exact": exact, "digit_share": digit_share}


def arithmetic_rows(n: int, split: str, seed: int) -> list[dict[str, Any]]:
    """Rows in verl's RL dataset schema (prompt as chat messages, reward_model.ground_truth)."""
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": split, "index": index},
        })
    return rows


def prepare(out_dir: str | Path, n_train: int = 64, n_val: int = 16) -> Path:
    """Write the tiny model and the train/val parquet files the smoke recipe reads; returns out_dir."""
    import pandas as pd

    from verl_gq.models import build_qwen_model, tiny_corpus, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(tiny_corpus(), vocab_size=512)
    build_qwen_model(tokenizer, family="qwen3", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                     seed=0, out_dir=out / "model")
    pd.DataFrame(arithmetic_rows(n_train, "train", seed=0)).to_parquet(out / "train.parquet")
    pd.DataFrame(arithmetic_rows(n_val, "val", seed=1)).to_parquet(out / "val.parquet")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m verl_gq.verl.smoke_task OUT_DIR")
    print(f"smoke assets written to {prepare(sys.argv[1])}")
