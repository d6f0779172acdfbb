"""Routing: per-example knob gradients from one backward, the hack direction, the band, the gate, the router.

Imports torch and verl_gq.adapter only: it knows nothing of verl or of rewards.
"""

from verl_gq.routing.band import (
    Band,
    BandCalibration,
    assign_folds,
    calibrate_band,
    fit_direction_and_band,
    frout_matched_band,
)
from verl_gq.routing.capture import CAPTURE_MODES, KnobGradientCapture, ModuleRows, Segments
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
from verl_gq.routing.gate import GateResult, gate
from verl_gq.routing.router import GradientRouter, RoutedGradients, write_knob_grads

__all__ = [
    "Band",
    "BandCalibration",
    "CAPTURE_MODES",
    "Direction",
    "GateResult",
    "GradientRouter",
    "KnobGradientCapture",
    "ModuleRows",
    "Pair",
    "PairGradients",
    "RoutedGradients",
    "Segments",
    "assign_folds",
    "calibrate_band",
    "completion_log_prob_gradients",
    "direction_from_state",
    "direction_scores",
    "direction_state",
    "extract_direction",
    "fit_direction_and_band",
    "frout_matched_band",
    "gate",
    "haar_direction",
    "pair_gradients",
    "write_knob_grads",
]
