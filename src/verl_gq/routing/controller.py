"""Routers on one training run: their specs, and the controller that runs them beside an ordinary training step.

With the conserving optimizer (routing/optimizer.py) the model trains on the effective knob exactly as vanilla does,
whatever is routed. A router only decides how each step's update is split between its kept knob and its quarantine,
so several routers can ride one run: each gates the same stashed gradients with its own direction and band and keeps
its own quarantine (a knob column). Router r's deployed model is the effective knob minus its quarantine; the
arms are paired by construction (same run, same rollouts, same seed).

The controller owns the routers' state (directions, bands, the step counter) and the per-step bookkeeping; the
training engine owns the model and its micro-batch loop. From a micro-batch the controller reads only what the
capture stashed, the knob gradients of the policy loss: never rewards, labels or the batch's extra fields (the
no-cheat invariant). It knows nothing of verl.

Schedule: a router's direction (and calibrated band) is extracted before its first step and again every `refresh`
steps on the same pair texts with the current weights (0: frozen). The pairs' gradients are taken once per step
for all routers due then, each using its own subset (its direction modes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Union

import torch
from torch.profiler import record_function

from verl_gq.adapter.model import QuarantineAdapter
from verl_gq.routing.band import Band, direction_and_band, frout_matched_band
from verl_gq.routing.capture import KnobGradientCapture
from verl_gq.routing.direction import (
    DIRECTION_PREFIX,
    Direction,
    Pair,
    direction_from_state,
    direction_state,
    pair_gradients,
)
from verl_gq.routing.gate import LiveBand, gate
from verl_gq.routing.metrics import Refresh, StepMetrics
from verl_gq.routing.router import GradientRouter, Reduce

logger = logging.getLogger(__name__)

GRANULARITIES = ("rollout", "token")
DIRECTIONS = ("pairs", "haar")
BANDS = ("calibrated", "frout_match", "constant")
MIN_PAIRS = 4  # two calibration folds of two
STEP_KEY = "optimizer_steps"


class RouterSpecError(ValueError):
    """A router spec that cannot work; the message names the router and the field."""


@dataclass(frozen=True)
class RouterSpec:
    """One router.

    name: the router's (and its quarantine's, and its arm's) name.
    granularity: rollout (one gate weight per rollout) | token (one per response position; the rest of a rollout
        takes the rollout's weight).
    direction: pairs (the hack direction of the pair set) | haar (random directions of the real one's per-module
        shape, rank and norms: the random-V control).
    direction_modes: modes whose pairs build the direction and band; empty = all (held-out modes: the others).
    direction_rank: k directions; the score is the largest cosine with any.
    refresh: re-extract every N steps on the same pair texts with the current weights; 0 = frozen.
    band: calibrated (cross-fitted on held-out pairs: lower = clean_quantile of clean scores, upper = hack_quantile
        of hack scores) | frout_match (placed on each micro-batch's live scores to route `frout_target` of the
        gradient mass, or, with `match`, the fraction router `match` routes on the same micro-batch) | constant
        (no direction: every unit routed at the fraction router `match` routes that step: the constant-w control).
    seed: seed of the calibration folds and the Haar directions (None: the run's).
    """

    name: str
    granularity: str = "rollout"
    direction: str = "pairs"
    direction_modes: tuple[str, ...] = ()
    direction_rank: int = 1
    refresh: int = 5
    band: str = "calibrated"
    clean_quantile: float = 0.9
    hack_quantile: float = 0.1
    calibration_folds: int = 2
    frout_target: Optional[float] = None
    match: Optional[str] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction_modes", tuple(self.direction_modes))

        def bad(field_name: str, why: str) -> RouterSpecError:
            return RouterSpecError(f"router {self.name!r}: {field_name}={getattr(self, field_name)!r}: {why}")

        choices = {"granularity": GRANULARITIES, "direction": DIRECTIONS, "band": BANDS}
        for field_name, allowed in choices.items():
            if getattr(self, field_name) not in allowed:
                raise bad(field_name, f"must be one of {list(allowed)}")
        if isinstance(self.direction_rank, bool) or not isinstance(self.direction_rank, int) or self.direction_rank < 1:
            raise bad("direction_rank", "must be an int >= 1")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 0:
            raise bad("refresh", "must be an int >= 0 (0 = frozen direction)")
        for field_name in ("clean_quantile", "hack_quantile"):
            if not 0.0 <= getattr(self, field_name) <= 1.0:
                raise bad(field_name, "must lie in [0, 1]")
        if self.clean_quantile < self.hack_quantile:
            raise bad("clean_quantile", f"must be >= hack_quantile={self.hack_quantile}: the band's lower bound is a "
                      "high quantile of clean scores and its upper bound a low quantile of hack scores (reversed, the "
                      "band spans most scores and routes most of the gradient)")
        if self.calibration_folds < 2:
            raise bad("calibration_folds", "cross-fitting needs at least 2 folds")
        if self.band == "frout_match":
            if (self.frout_target is None) == (self.match is None):
                raise bad("band", "frout_match needs exactly one of frout_target (a fixed fraction) or match (a router)")
            if self.frout_target is not None and not 0.0 < self.frout_target < 1.0:
                raise bad("frout_target", "must lie in (0, 1)")
        elif self.frout_target is not None:
            raise bad("frout_target", "is read only by band=frout_match")
        if self.band == "constant" and self.match is None:
            raise bad("match", "band=constant needs the router whose routed fraction it applies to every unit")
        if self.band == "calibrated" and self.match is not None:
            raise bad("match", "a calibrated band matches no router")
        if self.match == self.name:
            raise bad("match", "a router cannot match itself")

    @property
    def needs_direction(self) -> bool:
        return self.band != "constant"


def check_routers(specs: Sequence[RouterSpec]) -> list[RouterSpec]:
    """The routers in gating order (a router after the one it matches), after checking names and references."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise RouterSpecError(f"router names {names}: a name appears twice")
    by_name = {spec.name: spec for spec in specs}
    for spec in specs:
        if spec.match is not None:
            other = by_name.get(spec.match)
            if other is None:
                raise RouterSpecError(f"router {spec.name!r}: match={spec.match!r} names no router (routers: {names})")
            if other.band == "constant":
                raise RouterSpecError(f"router {spec.name!r}: match={spec.match!r} is a constant router itself")
            if spec.band == "frout_match" and other.match is not None:
                raise RouterSpecError(f"router {spec.name!r}: match={spec.match!r} matches another router itself; "
                                      "match a router with its own band")
    return sorted(specs, key=lambda spec: spec.match is not None)


@dataclass
class RouterState:
    spec: RouterSpec
    pair_index: Optional[torch.Tensor] = None  # the pairs of its direction modes
    direction: Optional[Direction] = None
    band: Optional[Band] = None
    refresh: Optional[Refresh] = field(default=None)


class RoutingController:
    """Runs routers beside a training step. Per step: `begin_step()`, then per micro-batch, after its backward,
    `route(capture)`, then `end_step()` -> (the knobs' full (r, 1 + R) gradients in adapter order, StepMetrics).

    specs: the routers; their names must be the adapter's quarantines, in the same order.
    pairs: every pair (all modes), tokenised; each router uses those of its direction modes.
    run_model: calls the model HF-style, `run_model(input_ids=, attention_mask=, use_cache=False, logits_to_keep=)`,
        for the pair gradients.
    reduce: all-reduce SUM over data-parallel ranks of one flat tensor; dp_size: the routed gradients are divided by
        it, as FSDP averages gradients over ranks.
    """

    def __init__(self, specs: Sequence[RouterSpec], adapter: QuarantineAdapter, pairs: Sequence[Pair],
                 run_model: Callable, reduce: Optional[Reduce] = None, dp_size: int = 1, seed: int = 0,
                 pair_micro_batch: int = 8, pair_max_tokens: Optional[int] = None) -> None:
        names = [spec.name for spec in specs]
        if names != adapter.quarantine_names:
            raise RouterSpecError(f"routers {names} must be the adapter's quarantines, in order "
                                  f"({adapter.quarantine_names})")
        self.gating_order = check_routers(specs)
        self.specs = list(specs)
        self.adapter = adapter
        self.pairs = list(pairs)
        self.run_model = run_model
        self.reduce = reduce
        self.dp_size = dp_size
        self.seed = seed
        self.pair_micro_batch = pair_micro_batch
        self.pair_max_tokens = pair_max_tokens
        self.states = {spec.name: RouterState(spec) for spec in specs}
        for state in self.states.values():
            if state.spec.needs_direction:
                state.pair_index = self._pair_index(state.spec)
        self._routers: dict[tuple[str, ...], GradientRouter] = {}
        self.active: tuple[str, ...] = tuple(names)
        self.optimizer_steps = 0
        self._stashed = False

    def set_active(self, names: Optional[Sequence[str]]) -> None:
        """Route with these routers only (None: all). The others route nothing while inactive: their quarantines get
        no gradient and their directions are not refreshed. For benchmarks and diagnostics; a router that matches
        another needs that one active too."""
        names = tuple(self.states) if names is None else tuple(names)
        unknown = [n for n in names if n not in self.states]
        if unknown:
            raise RouterSpecError(f"routers {unknown} are not configured (routers: {list(self.states)})")
        for name in names:
            match = self.states[name].spec.match
            if match is not None and match not in names:
                raise RouterSpecError(f"router {name!r} matches {match!r}, which would be inactive")
        self.active = tuple(n for n in self.states if n in names)

    @property
    def router(self) -> GradientRouter:
        """The step's gradient router over the active routers."""
        if self.active not in self._routers:
            specs = [self.states[name].spec for name in self.active]
            self._routers[self.active] = GradientRouter(
                self.adapter.module_names, list(self.active),
                constant={s.name: s.match for s in specs if s.band == "constant"})
        return self._routers[self.active]

    def _pair_index(self, spec: RouterSpec) -> torch.Tensor:
        modes = set(spec.direction_modes)
        index = [i for i, pair in enumerate(self.pairs) if not modes or pair.mode in modes]
        if len(index) < MIN_PAIRS:
            raise RouterSpecError(
                f"router {spec.name!r}: {len(index)} pairs of modes {sorted(modes) or 'all'}; its direction and band "
                f"need at least {MIN_PAIRS} (two calibration folds of two)")
        return torch.tensor(index)

    # --- directions and bands ----------------------------------------------------------------------------------

    def _due(self, state: RouterState) -> bool:
        if not state.spec.needs_direction:
            return False
        if state.direction is None:
            return True
        return state.spec.refresh > 0 and self.optimizer_steps % state.spec.refresh == 0

    def refresh(self, names: Optional[Sequence[str]] = None) -> None:
        """Re-extract the directions (and calibrate the bands) of routers `names` (default: those due) from the pairs
        with the current weights; the pairs' gradients are taken once for all of them."""
        due = ([self.states[n] for n in names] if names is not None else
               [self.states[n] for n in self.active if self._due(self.states[n])])
        due = [state for state in due if state.spec.needs_direction]
        if not due:
            return
        started = time.perf_counter()
        with record_function("gq:refresh"):
            self._refresh(due, started)

    def _refresh(self, due: list[RouterState], started: float) -> None:
        grads = pair_gradients(self.run_model, self.adapter, self.pairs, micro_batch_size=self.pair_micro_batch,
                               max_tokens=self.pair_max_tokens)
        shared_seconds = time.perf_counter() - started
        for state in due:
            began = time.perf_counter()
            spec = state.spec
            seed = self.seed if spec.seed is None else spec.seed
            subset = grads.subset(state.pair_index)
            state.direction, calibration = direction_and_band(
                subset, [self.pairs[i].mode for i in state.pair_index.tolist()], n_folds=spec.calibration_folds,
                seed=seed, k=spec.direction_rank, clean_quantile=spec.clean_quantile, hack_quantile=spec.hack_quantile,
                haar_seed=seed if spec.direction == "haar" else None)
            state.band = calibration.band
            state.refresh = Refresh(seconds=shared_seconds + time.perf_counter() - began,
                                    band_lower=calibration.band.lower, band_upper=calibration.band.upper,
                                    pair_hack_score_mean=float(calibration.hack_scores.mean()),
                                    pair_clean_score_mean=float(calibration.clean_scores.mean()))
            logger.info("gq: router %s refreshed at step %d, band [%.4f, %.4f]", spec.name, self.optimizer_steps,
                        calibration.band.lower, calibration.band.upper)

    # --- one optimizer step -------------------------------------------------------------------------------------

    def begin_step(self) -> None:
        if not self.active:
            raise RuntimeError("no router is active: the step has nothing to route (train it as vanilla)")
        for state in self.states.values():
            state.refresh = None
        self.refresh()
        self._stashed = False

    def mark_stashed(self) -> None:
        """The capture holds a micro-batch's finished backward (call after each micro-batch's backward)."""
        self._stashed = True

    def route(self, capture: KnobGradientCapture) -> None:
        """Gate the micro-batch whose backward filled `capture` with every router (no-op if nothing is stashed)."""
        if not self._stashed:
            return
        with record_function("gq:route"):
            self._route(capture)
        self._stashed = False

    def _route(self, capture: KnobGradientCapture) -> None:
        examples, tokens = capture.stashed_rows()
        self.router.add_examples(examples, tokens)
        fractions: dict[str, torch.Tensor] = {}
        for spec in self.gating_order:
            if spec.band == "constant" or spec.name not in self.active:
                continue
            state = self.states[spec.name]
            band = self._band(spec, state, fractions)
            rollout_gate = gate(examples, state.direction, band)
            if spec.granularity == "token":
                if tokens is None:
                    raise RuntimeError(f"router {spec.name!r} gates tokens but the capture stashed none: build the "
                                       "segments with a token mask")
                token_gate = gate(tokens, state.direction, band)
                fractions[spec.name] = self.router.add_tokens(spec.name, rollout_gate, token_gate,
                                                              capture.segments.example_of_token)
            else:
                fractions[spec.name] = self.router.add(spec.name, rollout_gate)

    def _band(self, spec: RouterSpec, state: RouterState, fractions: dict[str, torch.Tensor]) -> Union[Band, LiveBand]:
        if spec.band == "calibrated":
            return state.band
        target = spec.frout_target if spec.match is None else fractions[spec.match]

        def live_band(scores: torch.Tensor, masses: torch.Tensor) -> Band:
            # placed so these units route the target fraction of their mass; the width is the live scores' spread
            # (a random direction has no calibrated width to borrow)
            width = scores.double().std(correction=0).clamp_min(1e-6) if scores.numel() > 1 else 1e-6
            return frout_matched_band(scores, masses, target, width)

        return live_band

    def end_step(self, capture: KnobGradientCapture) -> tuple[list[torch.Tensor], StepMetrics]:
        """Route the last micro-batch, reduce across ranks; return every knob's full (r, 1 + R) gradient (adapter
        order; column 0 the total, column j + 1 router j's quarantine) and the step's metrics."""
        self.route(capture)
        with record_function("gq:finish"):
            routed = self.router.finish(reduce=self.reduce, grad_scale=1.0 / self.dp_size)
        self.optimizer_steps += 1
        metrics = routed.metrics
        routers = {name: replace(m, refresh=self.states[name].refresh) for name, m in metrics.routers.items()}
        metrics = StepMetrics(metrics.n_examples, metrics.total_grad_norm, routers)
        grads = [routed.knob_grads[name] for name in self.adapter.module_names]
        if len(self.active) < len(self.states):  # the inactive routers' quarantine columns get zeros
            columns = [0] + [1 + list(self.states).index(name) for name in self.active]
            full = []
            for grad in grads:
                padded = grad.new_zeros(grad.shape[0], 1 + len(self.states))
                padded[:, columns] = grad
                full.append(padded)
            grads = full
        return grads, metrics

    # --- state -------------------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The step counter and every router's direction and band, for the adapter file and checkpoints."""
        tensors = {STEP_KEY: torch.tensor([self.optimizer_steps], dtype=torch.int64)}
        for name, state in self.states.items():
            if state.direction is not None:
                tensors.update({f"router.{name}.{k}": v for k, v in direction_state(state.direction).items()})
                tensors.update(state.band.state(key=f"router.{name}.band"))
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.optimizer_steps = int(tensors[STEP_KEY].item())
        device = self.adapter.knob_parameters()[0].device
        for name, state in self.states.items():
            prefix = f"router.{name}."
            own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            if not state.spec.needs_direction:
                continue
            if not any(key.startswith(DIRECTION_PREFIX) for key in own):
                raise KeyError(f"the saved state has no direction for router {name!r} (routers saved: "
                               f"{sorted({k.split('.')[1] for k in tensors if k.startswith('router.')})})")
            restored = direction_from_state(own, self.adapter.module_names)  # files sort keys: adapter order
            state.direction = {m: v.to(device) for m, v in restored.items()}
            state.band = Band.from_state(own)
        logger.info("gq: restored step %d and the directions of %s", self.optimizer_steps, list(self.states))
