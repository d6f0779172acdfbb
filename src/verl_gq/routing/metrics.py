"""The routing metrics of one optimizer step, as one typed record, and their flat names.

The engine hands them to verl as flat scalars (`gq/<key>`, which verl logs as `actor/gq/<key>`); the trainer reads
them back into the same record. `StepMetrics.flat` and `StepMetrics.from_flat` are the only places the names are
spelled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional

SCORE_STATS = ("mean", "std", "min", "max", "p10", "p50", "p90")


@dataclass(frozen=True)
class ScoreStats:
    """Distribution of cos(u, v) over a step's gated units on this rank."""

    mean: float
    std: float
    min: float
    max: float
    p10: float
    p50: float
    p90: float


@dataclass(frozen=True)
class Refresh:
    """A direction and band re-extracted before the step: time taken, calibrated band, held-out pair scores."""

    seconds: float
    band_lower: float
    band_upper: float
    pair_hack_score_mean: float
    pair_clean_score_mean: float


@dataclass(frozen=True)
class RouterMetrics:
    """One router's step. frout: routed fraction of gradient mass (sum_u w_u ||g_u|| / sum_u ||g_u||, global);
    kept/quarantine_grad_norm: norms of its kept (total - routed) and routed gradients; band: the last gated
    micro-batch's [lower, upper] (None for a router with no band); band_degenerate_fraction: micro-batches gated with
    a degenerate band; cos/token_cos: score statistics of its rollouts / tokens; refresh: set on refresh steps;
    quarantine_to_effective_norm: ||q|| / ||s|| over all knobs after the step's update, its quarantine against the
    effective knob (the routed share divides by the effective gradient's second moment, so it can outgrow s where
    the total gradient cancels: docs/method.md, section 6)."""

    frout: float
    kept_grad_norm: float
    quarantine_grad_norm: float
    band_degenerate_fraction: float = 0.0
    band_lower: Optional[float] = None
    band_upper: Optional[float] = None
    cos: Optional[ScoreStats] = None
    token_cos: Optional[ScoreStats] = None
    refresh: Optional[Refresh] = None
    quarantine_to_effective_norm: Optional[float] = None


@dataclass(frozen=True)
class StepMetrics:
    """The step: examples routed (global), the norm of the total (effective, vanilla) gradient, and each router's."""

    n_examples: float
    total_grad_norm: float
    routers: dict[str, RouterMetrics] = field(default_factory=dict)

    def with_quarantine_norms(self, ratios: Mapping[str, float]) -> "StepMetrics":
        """This record with each named router's quarantine_to_effective_norm set."""
        routers = {name: dataclasses.replace(router, quarantine_to_effective_norm=float(ratios[name]))
                   if name in ratios else router for name, router in self.routers.items()}
        return dataclasses.replace(self, routers=routers)

    def flat(self) -> dict[str, float]:
        """{name: value} for verl's metrics: `n_examples`, `total_grad_norm`, `<router>/<field>` and
        `<router>/<group>/<stat>` (cos, token_cos, refresh); None fields are left out."""
        out = {"n_examples": float(self.n_examples), "total_grad_norm": float(self.total_grad_norm)}
        for name, router in self.routers.items():
            for key, value in dataclasses.asdict(router).items():
                if value is None:
                    continue
                if isinstance(value, dict):
                    out.update({f"{name}/{key}/{stat}": float(v) for stat, v in value.items()})
                else:
                    out[f"{name}/{key}"] = float(value)
        return out

    @classmethod
    def from_flat(cls, values: Mapping[str, float], prefix: str = "") -> Optional["StepMetrics"]:
        """The record from flat metrics whose names start with `prefix` (e.g. `actor/gq/`); None when it has none."""
        own = {key[len(prefix):]: value for key, value in values.items() if key.startswith(prefix)}
        if "total_grad_norm" not in own:
            return None
        routers: dict[str, dict] = {}
        for key, value in own.items():
            parts = key.split("/")
            if len(parts) == 2:
                routers.setdefault(parts[0], {})[parts[1]] = float(value)
            elif len(parts) == 3:
                routers.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = float(value)
        groups = {"cos": ScoreStats, "token_cos": ScoreStats, "refresh": Refresh}
        parsed = {}
        for name, fields in routers.items():
            for group, kind in groups.items():
                if group in fields:
                    fields[group] = kind(**fields[group])
            parsed[name] = RouterMetrics(**fields)
        return cls(n_examples=float(own["n_examples"]), total_grad_norm=float(own["total_grad_norm"]), routers=parsed)
