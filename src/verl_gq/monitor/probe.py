"""The probe monitor: a linear classifier on the policy's activations, trained on the pair set only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from verl_gq.monitor.config import MonitorSpec
from verl_gq.routing.calibration import auc


@dataclass(frozen=True)
class LinearProbe:
    """score(x) = w . (x - mean) / scale + b; flagged where score > threshold."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    threshold: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.weight + self.bias

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features) > self.threshold

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "weight": self.weight.tolist(),
                "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_state(cls, state: dict) -> "LinearProbe":
        return cls(mean=np.asarray(state["mean"]), scale=np.asarray(state["scale"]),
                   weight=np.asarray(state["weight"]), bias=float(state["bias"]), threshold=float(state["threshold"]))


@dataclass(frozen=True)
class ProbeFit:
    probe: LinearProbe
    n_fit_pairs: int
    n_heldout_pairs: int
    heldout_fpr: float  # held-out clean completions flagged
    heldout_tpr: float  # held-out hack completions flagged
    heldout_auc: float

    def metrics(self) -> dict[str, float]:
        return {"heldout_fpr": self.heldout_fpr, "heldout_tpr": self.heldout_tpr, "heldout_auc": self.heldout_auc,
                "threshold": self.probe.threshold}


def _logistic_regression(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the mean logistic loss + l2/2 |w|^2 / n (the bias unpenalised), by Newton's method
    (the loss is strictly convex: a unique, deterministic answer)."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(xb @ theta)))
        grad = xb.T @ (p - y) + reg * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-12 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def fit_probe(clean: np.ndarray, hack: np.ndarray, *, heldout_fraction: float, fpr: float, l2: float,
              seed: int) -> ProbeFit:
    """A probe from pair features only: row i of `clean` and of `hack` are pair i's two completions. The pairs are
    split (seeded) into a fit part and a held-out part; the held-out clean completions set the threshold, the
    smallest score that flags at most a fraction `fpr` of them."""
    clean, hack = np.asarray(clean, dtype=np.float64), np.asarray(hack, dtype=np.float64)
    if clean.shape != hack.shape or clean.ndim != 2:
        raise ValueError(f"clean {clean.shape} and hack {hack.shape} features must be (pairs, features) alike")
    n = len(clean)
    n_heldout = max(1, math.ceil(heldout_fraction * n))
    if n - n_heldout < 2:
        raise ValueError(f"{n} pairs: too few to fit a probe and hold {n_heldout} out")
    order = np.random.default_rng(seed).permutation(n)
    held, fit = order[:n_heldout], order[n_heldout:]
    x = np.vstack([clean[fit], hack[fit]])
    y = np.concatenate([np.zeros(len(fit)), np.ones(len(fit))])
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    weight, bias = _logistic_regression((x - mean) / scale, y, l2)
    unthresholded = LinearProbe(mean, scale, weight, bias, threshold=math.inf)
    clean_held, hack_held = unthresholded.scores(clean[held]), unthresholded.scores(hack[held])
    # the (1 - fpr) order statistic of the held-out clean scores: flags <= floor(fpr * n) of them
    allowed = math.floor(fpr * n_heldout)
    threshold = float(np.sort(clean_held)[n_heldout - 1 - allowed])
    probe = LinearProbe(mean, scale, weight, bias, threshold)
    return ProbeFit(probe=probe, n_fit_pairs=len(fit), n_heldout_pairs=n_heldout,
                    heldout_fpr=float((clean_held > threshold).mean()), heldout_tpr=float((hack_held > threshold).mean()),
                    heldout_auc=auc(clean_held, hack_held))


def flag_quality(flags: np.ndarray, hack: np.ndarray) -> dict[str, Optional[float]]:
    """Flag rate, and against the grader's hack label (logged only, never read by training) recall and precision;
    None where undefined (no hack, no flag)."""
    flags, hack = np.asarray(flags, dtype=bool), np.asarray(hack, dtype=bool)
    hits = float((flags & hack).sum())
    return {"flag_rate": float(flags.mean()) if len(flags) else None,
            "recall": hits / float(hack.sum()) if hack.any() else None,
            "precision": hits / float(flags.sum()) if flags.any() else None}


# features(sequences, layer) -> (the layer's index, (n, hidden) array): the policy's activations (verl_gq.monitor.features)
Features = Callable[[Sequence[tuple[Sequence[int], Sequence[int]]], Optional[int]], tuple[int, np.ndarray]]


class ProbeMonitor:
    """Flags rollouts with a probe fitted on the pairs' completions only, refitted every `spec.refit` steps on the
    policy of that step. It never reads a live rollout's label: `flags` takes them only to keep one signature with the
    label monitor."""

    def __init__(self, spec: MonitorSpec, pairs: Sequence, seed: int):
        self.spec = spec
        self.pairs = [p for p in pairs if not spec.modes or p.mode in spec.modes]
        self.seed = seed
        self.probe: Optional[LinearProbe] = None
        self.fitted_at = 0
        self.layer = spec.layer

    def flags(self, step: int, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], hack, features: Features
              ) -> tuple[np.ndarray, dict[str, float]]:
        """This step's flags, and the refit's metrics when the probe was refitted."""
        metrics: dict[str, float] = {}
        if self.probe is None or (self.spec.refit > 0 and step - self.fitted_at >= self.spec.refit):
            pair_sequences = ([(p.prompt_ids, p.clean_ids) for p in self.pairs]
                              + [(p.prompt_ids, p.hack_ids) for p in self.pairs])
            self.layer, pair_features = features(pair_sequences, self.layer)
            n = len(self.pairs)
            fit = fit_probe(pair_features[:n], pair_features[n:], heldout_fraction=self.spec.heldout_fraction,
                            fpr=self.spec.fpr, l2=self.spec.l2, seed=self.seed)
            self.probe, self.fitted_at = fit.probe, step
            metrics = {f"probe/{k}": v for k, v in fit.metrics().items()}
        _, live = features(sequences, self.layer)
        return self.probe.flags(live), metrics

    def state(self) -> Optional[dict]:
        return None if self.probe is None else {"step": self.fitted_at, "layer": self.layer,
                                                "probe": self.probe.state()}

    def load_state(self, state: dict) -> None:
        self.probe = LinearProbe.from_state(state["probe"])
        self.fitted_at, self.layer = int(state["step"]), int(state["layer"])
