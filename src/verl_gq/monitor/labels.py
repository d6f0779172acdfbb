"""The ground-truth-label monitor: the grader's hack label, flipped at a set accuracy. It READS LABELS (the routers
and the probe never do): the reference for what a detector of that accuracy would give, not a method."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Optional, Sequence

import numpy as np


def sample_keys(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[bytes]:
    """One key per sample from its tokens (and its ordinal among identical samples), the same in every run that
    samples the same tokens: verl's batch keys hold random uuids."""
    seen: Counter = Counter()
    keys = []
    for prompt, response in zip(prompts, responses, strict=True):
        digest = hashlib.sha256(np.asarray(list(prompt) + [-1] + list(response), dtype=np.int64).tobytes()).digest()
        keys.append(digest + seen[digest].to_bytes(4, "little"))
        seen[digest] += 1
    return keys


class GroundTruthLabelMonitor:
    def __init__(self, accuracy: float, seed: int):
        self.accuracy = accuracy
        self.seed = seed

    def flags(self, step: int, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], hack: Optional[np.ndarray],
              features=None) -> tuple[np.ndarray, dict[str, float]]:
        """Flag a hack with probability `accuracy`, any other sample with 1 - `accuracy`; each sample's draw is keyed
        by (seed, step, its tokens), so a rerun or a resumed run flags the same samples. Reads no activations."""
        if hack is None:
            raise ValueError("the gt_labels monitor reads the reward's per-sample `hack` field, which this run's reward "
                             "does not write (use reward.verl_entry.compute_score)")
        hack = np.asarray(hack, dtype=bool)
        keys = sample_keys([p for p, _ in sequences], [r for _, r in sequences])
        if len(hack) != len(keys):
            raise ValueError(f"{len(hack)} labels for {len(keys)} samples")
        draws = np.array([
            np.random.default_rng([self.seed, step, *np.frombuffer(key, dtype=np.uint32).tolist()]).random()
            for key in keys
        ])
        correct = draws < self.accuracy
        return np.where(correct, hack, ~hack), {}

    def state(self) -> None:
        return None  # nothing to restore: every draw is keyed
