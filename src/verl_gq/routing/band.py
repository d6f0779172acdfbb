"""The band [lower, upper] that turns a cosine score into a routed fraction, calibrated by cross-fitting on pairs.

Cross-fitting: pairs are dealt into folds (stratified by mode, seeded). For each fold, a direction is extracted from
the other folds and the fold's held-out hack and clean completions are scored by cos(u, v) with u = +grad log p
(the update direction if that completion were reinforced). All held-out scores are pooled: lower = the
`clean_quantile` quantile of clean scores, upper = the `hack_quantile` quantile of hack scores. The live direction
is then extracted from all pairs; the held-out scores stand in for how it scores completions it has not seen.

A band with upper <= lower (or not finite) is degenerate: it routes nothing, is logged as a warning, and the
router reports it in its metrics; it never produces NaN weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from verl_gq.adapter.model import QuarantineAdapter
from verl_gq.routing.direction import (
    Direction,
    Pair,
    PairGradients,
    direction_scores,
    extract_direction,
    haar_direction,
    pair_gradients,
)

logger = logging.getLogger(__name__)
BAND_KEY = "band"


@dataclass(frozen=True)
class Band:
    """Routed fraction w = clip((score - lower) / (upper - lower), 0, 1); nothing routed when degenerate.

    The bounds are floats (a calibrated band), or 0-dim tensors on the scores' device (a band placed from the
    live batch, `frout_matched_band`), so that placing and applying it needs no host sync."""

    lower: Union[float, torch.Tensor]
    upper: Union[float, torch.Tensor]

    @property
    def width(self) -> Union[float, torch.Tensor]:
        return self.upper - self.lower

    @property
    def degenerate(self) -> bool:
        return not bool(self.upper > self.lower)  # also True for NaN bounds

    def degenerate_flag(self, device: torch.device) -> torch.Tensor:
        """`degenerate` as a 0-dim bool tensor on `device`, without a host sync for tensor bounds."""
        if isinstance(self.lower, torch.Tensor) or isinstance(self.upper, torch.Tensor):
            return ~(torch.as_tensor(self.upper, device=device) > torch.as_tensor(self.lower, device=device))
        return torch.tensor(self.degenerate).to(device, non_blocking=True)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lower, torch.Tensor) or isinstance(self.upper, torch.Tensor):
            width = self.upper - self.lower
            weights = ((scores - self.lower) / width).clamp(0.0, 1.0)
            return torch.where(width > 0, weights, torch.zeros_like(weights))
        if self.degenerate:
            return torch.zeros_like(scores)
        return ((scores - self.lower) / self.width).clamp(0.0, 1.0)

    def state(self, key: str = BAND_KEY) -> dict[str, torch.Tensor]:
        """Tensors to save with the adapter file."""
        return {key: torch.tensor([float(self.lower), float(self.upper)], dtype=torch.float64)}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], key: str = BAND_KEY) -> "Band":
        if key not in tensors or tensors[key].shape != (2,):
            raise ValueError(f"state should hold '{key}' = [lower, upper]")
        lower, upper = tensors[key].tolist()
        return cls(lower, upper)


@dataclass(frozen=True)
class BandCalibration:
    """A calibrated band and the held-out scores it came from (index i = pair i)."""

    band: Band
    clean_scores: torch.Tensor
    hack_scores: torch.Tensor
    folds: torch.Tensor


def assign_folds(modes: Sequence[str], n_folds: int, seed: int) -> torch.Tensor:
    """(n_pairs,) fold id per pair: within each mode, a seeded shuffle dealt round-robin, continuing across modes,
    so folds are balanced in size and in modes."""
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds}: cross-fitting needs at least 2 folds")
    if len(modes) < n_folds:
        raise ValueError(f"{len(modes)} pairs cannot fill {n_folds} folds")
    generator = torch.Generator().manual_seed(seed)
    folds = torch.empty(len(modes), dtype=torch.long)
    dealt = 0
    for mode in sorted(set(modes)):
        members = torch.tensor([i for i, m in enumerate(modes) if m == mode])
        for member in members[torch.randperm(len(members), generator=generator)]:
            folds[member] = dealt % n_folds
            dealt += 1
    return folds


def calibrate_band(
    pair_grads: PairGradients,
    folds: torch.Tensor,
    make_direction: Callable[[PairGradients], Direction] = extract_direction,
    clean_quantile: float = 0.9,
    hack_quantile: float = 0.1,
) -> BandCalibration:
    """Cross-fitted band (see module docstring). `make_direction` maps extraction-fold pair gradients to a
    direction: `extract_direction` (k=1) by default, e.g. `lambda g: extract_direction(g, k=2)`, or
    `lambda g: haar_direction(extract_direction(g), seed)` to calibrate the random control the same way."""
    if folds.shape != (pair_grads.n_pairs,):
        raise ValueError(f"folds has shape {tuple(folds.shape)}, should be ({pair_grads.n_pairs},)")
    for name, q in (("clean_quantile", clean_quantile), ("hack_quantile", hack_quantile)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{name}={q}: must lie in [0, 1]")
    clean_scores = torch.empty(pair_grads.n_pairs, dtype=torch.float64)
    hack_scores = torch.empty(pair_grads.n_pairs, dtype=torch.float64)
    for fold in folds.unique().tolist():
        held_out = (folds == fold).nonzero().flatten()
        extraction = (folds != fold).nonzero().flatten()
        if len(extraction) == 0:
            raise ValueError("every pair is in one fold: cross-fitting needs at least 2 non-empty folds")
        direction = make_direction(pair_grads.subset(extraction))
        held = pair_grads.subset(held_out)
        clean_scores[held_out] = direction_scores(held.clean, direction).double().cpu()
        hack_scores[held_out] = direction_scores(held.hack, direction).double().cpu()
    band = Band(
        lower=torch.quantile(clean_scores, clean_quantile).item(),
        upper=torch.quantile(hack_scores, hack_quantile).item(),
    )
    if band.degenerate:
        logger.warning(
            "degenerate band: upper %.4f <= lower %.4f (held-out hack scores do not clear clean ones); "
            "the gate will route nothing",
            band.upper,
            band.lower,
        )
    return BandCalibration(band, clean_scores, hack_scores, folds)


def frout_matched_band(scores: torch.Tensor, masses: torch.Tensor, target: Union[float, torch.Tensor],
                       width: Union[float, torch.Tensor]) -> Band:
    """A band of the given width placed so that the routed fraction of gradient mass,
    sum_i w_i m_i / sum_i m_i with w_i = clip((s_i - lower) / width, 0, 1), equals `target`.

    The routed fraction is continuous and non-increasing in `lower`, so bisection (64 steps, on the scores' device)
    finds it. `target` and `width` may be 0-dim tensors on that device (another router's routed fraction on this
    micro-batch, the scores' own spread): the band's bounds are then tensors too and nothing waits for the device.
    Used by the random-direction control to route the same mass as a real router.
    """
    if not isinstance(target, torch.Tensor) and not 0.0 <= target <= 1.0:
        raise ValueError(f"target={target}: the routed fraction to match must lie in [0, 1]")
    if not isinstance(width, torch.Tensor) and not width > 0.0:
        raise ValueError(f"width={width}: frout matching needs a positive band width")
    if scores.shape != masses.shape or scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores {tuple(scores.shape)} and masses {tuple(masses.shape)} must be equal non-empty 1-D")
    scores, masses = scores.double(), masses.double()
    width = torch.as_tensor(width, dtype=torch.float64).to(scores.device, non_blocking=True)
    target = torch.as_tensor(target, dtype=torch.float64).to(scores.device, non_blocking=True)
    total = masses.sum()
    low, high = scores.min() - width, scores.max()  # routed fraction 1 at `low`, 0 at `high`
    for _ in range(64):
        middle = (low + high) / 2
        routed = (((scores - middle) / width).clamp(0.0, 1.0) * masses).sum()
        above = routed > target * total
        low = torch.where(above, middle, low)
        high = torch.where(above, high, middle)
    lower = (low + high) / 2
    return Band(lower, lower + width)


def fit_direction_and_band(
    model: nn.Module,
    adapter: QuarantineAdapter,
    pairs: Sequence[Pair],
    n_folds: int = 2,
    seed: int = 0,
    k: int = 1,
    clean_quantile: float = 0.9,
    hack_quantile: float = 0.1,
    haar_seed: Optional[int] = None,
    micro_batch_size: int = 8,
    shard: Optional[slice] = None,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    max_tokens: Optional[int] = None,
) -> tuple[Direction, BandCalibration]:
    """The live direction and its cross-fitted band from the current weights: the call at start and at each refresh
    (refresh = this call again: same pairs, current weights).

    With `haar_seed`, the random-V control: the live direction is `haar_direction(real, haar_seed)` and each fold's
    scoring direction is the Haar direction shaped like that fold's real one, so the control is calibrated alike.
    Distributed: every rank passes ALL pairs (folds are dealt over all of them), computes gradients for
    `pairs[shard]` only, and `gather` reassembles all ranks' rows in pair order (see `pair_gradients`).
    """
    if (shard is None) != (gather is None):
        raise ValueError("shard and gather go together: each rank computes its shard, gather reassembles all pairs")
    local = pairs if shard is None else pairs[shard]
    grads = pair_gradients(model, adapter, local, micro_batch_size=micro_batch_size, gather=gather,
                           max_tokens=max_tokens)
    if grads.n_pairs != len(pairs):
        raise ValueError(f"gathered {grads.n_pairs} pair gradients for {len(pairs)} pairs")
    return direction_and_band(grads, [pair.mode for pair in pairs], n_folds=n_folds, seed=seed, k=k,
                              clean_quantile=clean_quantile, hack_quantile=hack_quantile, haar_seed=haar_seed)


def direction_and_band(
    pair_grads: PairGradients,
    modes: Sequence[str],
    n_folds: int = 2,
    seed: int = 0,
    k: int = 1,
    clean_quantile: float = 0.9,
    hack_quantile: float = 0.1,
    haar_seed: Optional[int] = None,
) -> tuple[Direction, BandCalibration]:
    """`fit_direction_and_band` from pair gradients already taken (`modes[i]`: pair i's mode): the live direction
    from all of them, and the band cross-fitted over folds dealt from them. Several routers that share one refresh
    take the pair gradients once and each its own subset (`PairGradients.subset`)."""
    if len(modes) != pair_grads.n_pairs:
        raise ValueError(f"{len(modes)} modes for {pair_grads.n_pairs} pairs")
    folds = assign_folds(list(modes), n_folds, seed)

    def make_direction(fold_grads: PairGradients) -> Direction:
        real = extract_direction(fold_grads, k)
        return real if haar_seed is None else haar_direction(real, haar_seed)

    calibration = calibrate_band(pair_grads, folds, make_direction, clean_quantile, hack_quantile)
    return make_direction(pair_grads), calibration
