"""verl's custom reward function for the LeetCode loophole rows (reward.dataset):

    reward.custom_reward_function.path=<repo>/reward/verl_entry.py
    reward.custom_reward_function.name=compute_score

How verl 0.9.1 calls it (verl/experimental/reward_loop): `RewardLoopManager` starts `reward.num_workers` Ray actors
(`RewardLoopWorker`, default 8); each gets a chunk of the batch and makes one asyncio task per sample; the naive
reward manager's `run_single` then calls compute_score for ONE sample. A coroutine function is awaited on the
worker's event loop (a plain function would go to the loop's default thread pool). compute_score is therefore
`async` and hands the blocking grade to one thread pool per worker process, sized to the CPU count: the work
itself runs in sandboxed child processes, so threads that wait on them use every core, and the event loop keeps
every sample of the chunk in flight at once. (With W workers on one node up to W x cores sandboxes can run at
once; set reward.num_workers to 1-2 on small machines.)

The returned dict is numeric only (score, mode, compile, solve, hack, channel, and the sample's identity:
prompt_index = the row's extra_info.index, response_chars = the answer's length): verl takes "score" as the reward
and every key into reward_extra_info, stacked over the batch.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from reward.dataset import DATA_SOURCE, grading_task
from reward.grader import grade

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _grading_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="leetcode-grade")
        return _pool


async def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                        **kwargs) -> dict[str, float | int]:
    """Grade one response; raises (reward.dataset.RowError, ValueError) on a row this environment did not write.

    kwargs are what verl may add (reward_router_address, reward_model_tokenizer, reward_kwargs): not used."""
    if data_source != DATA_SOURCE:
        raise ValueError(f"compute_score grades data_source {DATA_SOURCE!r} rows only, got {data_source!r}")
    task = grading_task(ground_truth, extra_info)
    verdict = await asyncio.get_running_loop().run_in_executor(
        _grading_pool(), grade, task.problem, solution_str, task.mode, task.names)
    return {**verdict.to_reward_dict(), **sample_identity(extra_info, solution_str)}


SAMPLE_IDENTITY_FIELDS = ("prompt_index", "response_chars")


def sample_identity(extra_info: dict, solution_str: str) -> dict[str, int]:
    """Which prompt a graded answer belongs to and how long it is: what per-sample outcomes record beside the
    verdict (rows without an index, written by hand, get -1)."""
    return {"prompt_index": int(extra_info.get("index", -1)), "response_chars": len(solution_str)}
