"""Across-seed statistics of the tables: mean, standard error, and the paired t-test by seed.

Why a paired t-test: seed s of an arm and seed s of the baseline share initialisation, data order and sampling
seed, so the per-seed difference removes seed-to-seed variance that an unpaired test would count as noise.
With the 3-5 seeds a run budget allows, the Wilcoxon signed-rank test cannot reach p < 0.05 at all (its smallest
two-sided p with 5 pairs is 2/2^5 = 0.0625), so the t-test on the differences is the usable test; it assumes
the differences are roughly normal, which the table states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

TEST_NAME = "paired two-sided t-test across seeds (scipy.stats.ttest_rel)"


def mean_sem(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and standard error (sample std with ddof=1, over sqrt(n)); SEM is None for a single value."""
    if len(values) == 0:
        raise ValueError("mean_sem needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array[0]), None
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(len(array)))


@dataclass(frozen=True)
class PairedTest:
    """Arm minus baseline over the seeds both have. `p` and the 95% t interval of the mean difference (`ci95`) are
    None with a `note` when the test cannot be run."""

    seeds: tuple[int, ...]
    mean_diff: Optional[float]
    sem_diff: Optional[float]
    t: Optional[float]
    p: Optional[float]
    note: str
    ci95: Optional[tuple[float, float]] = None
    p_wilcoxon: Optional[float] = None  # exact signed-rank test of the same differences (robustness; needs >= 6 pairs
                                        # to reach p < 0.05 two-sided)

    @property
    def n_pairs(self) -> int:
        return len(self.seeds)


def paired_t_test(arm: Mapping[int, float], baseline: Mapping[int, float]) -> PairedTest:
    """Paired t-test of arm vs baseline, pairing values by seed (only seeds present in both count)."""
    seeds = tuple(sorted(set(arm) & set(baseline)))
    if not seeds:
        return PairedTest(seeds, None, None, None, None, "n/a (no seed in common)")
    diffs = [arm[s] - baseline[s] for s in seeds]
    mean_diff, sem_diff = mean_sem(diffs)
    if len(seeds) < 2:
        return PairedTest(seeds, mean_diff, None, None, None, "n/a (n<2 pairs)")
    if sem_diff == 0.0:
        return PairedTest(seeds, mean_diff, sem_diff, None, None, "n/a (all paired differences equal)")
    result = stats.ttest_rel([arm[s] for s in seeds], [baseline[s] for s in seeds])
    half = float(stats.t.ppf(0.975, len(seeds) - 1)) * sem_diff
    nonzero = [d for d in diffs if d != 0]
    p_wilcoxon = float(stats.wilcoxon(nonzero).pvalue) if nonzero else None
    return PairedTest(seeds, mean_diff, sem_diff, float(result.statistic), float(result.pvalue), "",
                      (mean_diff - half, mean_diff + half), p_wilcoxon)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (family-wise error <= alpha): the i-th smallest p times
    (m - i + 1), made monotone, capped at 1."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[key]))
        adjusted[key] = running
    return adjusted


def prompt_clustered_se(arm: Mapping[int, "pd.DataFrame"], baseline: Mapping[int, "pd.DataFrame"],
                        metric: str) -> Optional[float]:
    """Standard error of the paired difference (arm - baseline) in `metric` clustered by prompt, from per-sample
    outcomes by seed: each (seed, prompt) cell is the difference of the two views' mean over that prompt's samples;
    a prompt's cluster value is its cells' mean over seeds; SE = their sample std / sqrt(number of prompts). None when
    fewer than 2 seeds pair, or the paired seeds do not share one prompt set."""
    seeds = sorted(set(arm) & set(baseline))
    if len(seeds) < 2:
        return None
    cells = []
    for seed in seeds:
        mine = arm[seed].groupby("prompt")[metric].mean()
        theirs = baseline[seed].groupby("prompt")[metric].mean()
        if set(mine.index) != set(theirs.index):
            return None
        cells.append((mine - theirs.reindex(mine.index)).rename(seed))
    frame = pd.concat(cells, axis=1)
    if frame.isna().any().any() or len(frame) < 2:
        return None
    clusters = frame.mean(axis=1).to_numpy(dtype=np.float64)
    return float(clusters.std(ddof=1) / math.sqrt(len(clusters)))
