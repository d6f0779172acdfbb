"""Seeded, even, non-overlapping assignment of problems to loophole modes.

Every problem gets exactly one mode. The ids are sorted before shuffling, so the assignment depends only on the
set of ids and the seed (not on file order); modes are then dealt round-robin, so mode counts differ by at most one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from reward.modes import MODES, mode_id


def partition_modes(problem_ids: Sequence[str], seed: int, modes: Sequence[str] = MODES) -> dict[str, str]:
    """problem_id -> mode, even over `modes` (counts differ by at most one) and deterministic in (ids, seed)."""
    if len(set(problem_ids)) != len(problem_ids):
        raise ValueError("partition_modes: problem ids should be unique")
    if not modes or len(set(modes)) != len(modes):
        raise ValueError(f"partition_modes: modes should be a non-empty list of distinct modes, got {list(modes)}")
    for mode in modes:
        mode_id(mode)  # raises on an unknown mode
    order = sorted(problem_ids)
    random.Random(seed).shuffle(order)
    return {problem_id: modes[i % len(modes)] for i, problem_id in enumerate(order)}
