"""Routing: per-example knob gradients from one backward, the hack direction, the band, the gate, the routers on
one run, and the knobs' conserving optimizer.

Imports torch and verl_gq.adapter only: it knows nothing of verl or of rewards.
"""

from verl_gq.routing.band import (
    Band,
    BandCalibration,
    assign_folds,
    calibrate_band,
    direction_and_band,
    fit_direction_and_band,
    frout_matched_band,
)
from verl_gq.routing.capture import CAPTURE_MODES, KnobGradientCapture, ModuleRows, Segments
from verl_gq.routing.controller import RouterSpec, RouterSpecError, RoutingController, check_routers
from verl_gq.routing.direction import (
    Direction,
    Pair,
    PairGradients,
    completion_log_prob_gradients,
    direction_from_state,
    direction_scores,
    direction_state,
    extract_direction,
    haar_direction,
    pair_gradients,
)
from verl_gq.routing.gate import GateResult, LiveBand, gate
from verl_gq.routing.metrics import Refresh, RouterMetrics, ScoreStats, StepMetrics
from verl_gq.routing.optimizer import OPTIMIZERS, PerRowAdamW, QuarantineAdamW, build_knob_optimizer
from verl_gq.routing.pair_tokens import tokenize_pairs
from verl_gq.routing.router import GradientRouter, RoutedGradients, write_knob_grads

__all__ = [
    "Band",
    "BandCalibration",
    "CAPTURE_MODES",
    "Direction",
    "GateResult",
    "GradientRouter",
    "KnobGradientCapture",
    "LiveBand",
    "ModuleRows",
    "OPTIMIZERS",
    "Pair",
    "PairGradients",
    "PerRowAdamW",
    "QuarantineAdamW",
    "Refresh",
    "RoutedGradients",
    "RouterMetrics",
    "RouterSpec",
    "RouterSpecError",
    "RoutingController",
    "ScoreStats",
    "Segments",
    "StepMetrics",
    "assign_folds",
    "build_knob_optimizer",
    "calibrate_band",
    "check_routers",
    "completion_log_prob_gradients",
    "direction_and_band",
    "direction_from_state",
    "direction_scores",
    "direction_state",
    "extract_direction",
    "fit_direction_and_band",
    "frout_matched_band",
    "gate",
    "haar_direction",
    "pair_gradients",
    "tokenize_pairs",
    "write_knob_grads",
]
