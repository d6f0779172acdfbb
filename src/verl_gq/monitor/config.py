"""`gq.monitor`: which monitor flags live rollouts and which intervention acts on the flags."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

MONITORS = ("probe", "gt_labels")
INTERVENTIONS = ("penalty", "screening")


@dataclass(frozen=True)
class MonitorSpec:
    """kind: probe | gt_labels. intervention: penalty (the reward minus `penalty` where flagged) | screening (a flagged
    sample gets zero advantage and is left out of its group's mean and std).

    gt_labels: flags the grader's hack with probability `accuracy` and any other sample with 1 - `accuracy`. It reads
        the labels the routers never see: a reference for a detector of that accuracy, not a method.
    probe: logistic regression on the mean over completion tokens of decoder layer `layer`'s output (None: the middle
        layer), fitted on the pair file's clean (0) and hack (1) completions of `modes` (empty: all) with L2 weight
        `l2`; `heldout_fraction` of the pairs are kept out of the fit and set the threshold: a held-out clean
        completion is flagged with rate <= `fpr`. Refitted every `refit` steps on the current policy (0: once).
    """

    kind: str
    intervention: str
    penalty: float = 3.0  # the LeetCode substrate's pass reward (reward.grader.PASS_REWARD)
    accuracy: float = 0.9
    layer: Optional[int] = None
    modes: tuple[str, ...] = ()
    fpr: float = 0.05
    heldout_fraction: float = 0.25
    l2: float = 1.0
    refit: int = 5

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"gq.monitor.{name}={getattr(self, name)!r}: {why}")

        if self.kind not in MONITORS:
            raise bad("kind", f"must be one of {list(MONITORS)}")
        if self.intervention not in INTERVENTIONS:
            raise bad("intervention", f"must be one of {list(INTERVENTIONS)}")
        if not self.penalty >= 0:
            raise bad("penalty", "must be >= 0")
        if not 0.5 <= self.accuracy <= 1:
            raise bad("accuracy", "must be in [0.5, 1] (below 0.5 the flag is an inverted detector)")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
            raise bad("layer", "must be a decoder layer index >= 0, or null for the middle layer")
        if not 0 < self.fpr < 1:
            raise bad("fpr", "must be in (0, 1)")
        if not 0 < self.heldout_fraction < 1:
            raise bad("heldout_fraction", "must be in (0, 1)")
        if not self.l2 > 0:
            raise bad("l2", "must be > 0")
        if isinstance(self.refit, bool) or not isinstance(self.refit, int) or self.refit < 0:
            raise bad("refit", "must be an int >= 0 (0: fitted once)")
        object.__setattr__(self, "modes", tuple(self.modes))

    @property
    def name(self) -> str:
        """The arm's label, e.g. screening_probe, penalty_gt_labels90 (a label reader's accuracy in percent)."""
        monitor = self.kind if self.kind == "probe" else f"{self.kind}{self.accuracy * 100:g}"
        return f"{self.intervention}_{monitor}"

    @classmethod
    def from_any(cls, value: Any) -> Optional["MonitorSpec"]:
        """A spec from a mapping (None or an empty mapping: no monitor)."""
        if value is None or isinstance(value, cls):
            return value
        data = dict(value)
        if not data:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"gq.monitor: unknown keys {unknown}; known: {sorted(known)}")
        missing = [k for k in ("kind", "intervention") if k not in data]
        if missing:
            raise ValueError(f"gq.monitor: missing {missing}")
        if "modes" in data:
            data["modes"] = tuple(data["modes"] or ())
        return cls(**data)
