"""Choosing a router's direction rank and band quantiles from the pairs alone (nested cross-validation).

A study must not tune its routers on graded samples of the model it studies. What the pairs can say on their own:
deal them into outer folds (stratified by mode, seeded); for each outer fold, build the router exactly as a run
would from the other pairs (direction of rank k from all of them, band cross-fitted on them at the candidate
quantiles), and gate the outer fold's clean and hack completions, which neither saw. Pooled over the outer folds:
the mean routed fraction of held-out hack and of held-out clean completions, the AUC of hack over clean scores, and
how often the band came out degenerate.

The rule `choose_setting` applies: the held-out routed-hack minus routed-clean fraction (what the gate separates on
completions it has not seen) within `tolerance` (0.02) of the best candidate's, then the smallest rank, then the
widest band (highest clean quantile): a simpler router unless a richer one separates clearly better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from verl_gq.routing.band import assign_folds, calibrate_band
from verl_gq.routing.direction import PairGradients, direction_scores, extract_direction


@dataclass(frozen=True)
class HeldOutSetting:
    direction_rank: int
    clean_quantile: float
    hack_quantile: float
    routed_hack: float  # mean routed fraction of held-out hack completions (their +grad log p)
    routed_clean: float  # the same for held-out clean completions
    auc: float  # P(held-out hack score > held-out clean score)
    degenerate_folds: int  # outer folds whose band routed nothing

    @property
    def separation(self) -> float:
        return self.routed_hack - self.routed_clean

    def row(self) -> dict:
        return {**asdict(self), "separation": self.separation}


def auc(negative, positive) -> float:
    """P(a positive scores above a negative), ties counted half (arrays or tensors of scores)."""
    diff = np.asarray(positive, dtype=np.float64)[:, None] - np.asarray(negative, dtype=np.float64)[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def held_out_settings(grads: PairGradients, modes: Sequence[str], ranks: Sequence[int],
                      quantiles: Sequence[tuple[float, float]], *, outer_folds: int = 4, inner_folds: int = 2,
                      seed: int = 0) -> list[HeldOutSetting]:
    """Every (rank, (clean_quantile, hack_quantile)) candidate, measured on held-out pairs (module docstring). The
    inner folds and their seed are a run's (gq.routers' calibration_folds, gq.seed)."""
    outer = assign_folds(list(modes), outer_folds, seed)
    results = []
    for k in ranks:
        for clean_q, hack_q in quantiles:
            routed_hack, routed_clean, hack_scores, clean_scores, degenerate = [], [], [], [], 0
            for fold in range(outer_folds):
                held = (outer == fold).nonzero().flatten()
                rest = (outer != fold).nonzero().flatten()
                train = grads.subset(rest)
                inner = assign_folds([modes[i] for i in rest.tolist()], inner_folds, seed)
                band = calibrate_band(train, inner, lambda g: extract_direction(g, k), clean_q, hack_q).band
                direction = extract_direction(train, k)
                test = grads.subset(held)
                hack = direction_scores(test.hack, direction).double().cpu()
                clean = direction_scores(test.clean, direction).double().cpu()
                degenerate += int(band.degenerate)
                routed_hack.append(band.weights(hack).double())
                routed_clean.append(band.weights(clean).double())
                hack_scores.append(hack)
                clean_scores.append(clean)
            results.append(HeldOutSetting(
                direction_rank=k, clean_quantile=clean_q, hack_quantile=hack_q,
                routed_hack=float(torch.cat(routed_hack).mean()), routed_clean=float(torch.cat(routed_clean).mean()),
                auc=auc(torch.cat(clean_scores), torch.cat(hack_scores)), degenerate_folds=degenerate))
    return results


def choose_setting(settings: Sequence[HeldOutSetting], tolerance: float = 0.02) -> HeldOutSetting:
    """Among the candidates within `tolerance` of the best held-out separation: the smallest rank, then the widest
    band (highest clean quantile), then the best separation."""
    if not settings:
        raise ValueError("no candidate settings")
    best = max(s.separation for s in settings)
    near = [s for s in settings if s.separation >= best - tolerance]
    return min(near, key=lambda s: (s.direction_rank, -s.clean_quantile, -s.separation))
