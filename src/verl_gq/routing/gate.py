"""The gate: from one micro-batch's stashed policy-loss gradients to routed fractions w.

Its only inputs are gradients, a direction and a band: reward labels, hack flags and oracle fields have no
parameter to arrive through, and gradients must be keyed exactly by the direction's modules (an extra key is an
error), so no label can ride along in the gradient dict either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch

from verl_gq.routing.band import Band
from verl_gq.routing.capture import ModuleRows
from verl_gq.routing.direction import check_module_grads, flat_direction_scores


# A band placed from the batch itself (frout matching): (scores (n,), gradient masses (n,)) -> Band.
LiveBand = Callable[[torch.Tensor, torch.Tensor], Band]


@dataclass(frozen=True)
class GateResult:
    """weights (n,): routed fractions in [0, 1]; scores (n,): cos(u, v); band: the band used. grads: the gated
    gradient rows, module-flattened (the router sums these, so the stash is flattened once per micro-batch).
    finite: a 0-dim bool tensor, whether every row is finite (left on the device: the router checks it at the step's
    one host sync)."""

    weights: torch.Tensor
    scores: torch.Tensor
    band: Band
    grads: ModuleRows
    finite: torch.Tensor


def gate(
    policy_loss_grads: Union[Mapping[str, torch.Tensor], ModuleRows],
    direction: Mapping[str, torch.Tensor],
    band: Union[Band, LiveBand],
) -> GateResult:
    """Route fractions for each row (a rollout, or a token) of `policy_loss_grads`: {module: (n, r)}, or the same
    already side by side (the capture's `stashed_rows`).

    The stashed rows are g_i = dL_i/dknob of the policy loss; the update direction the row would cause is
    u_i = -g_i (= A_i grad log pi(y_i) for a plain policy gradient). w_i = clip((cos(u_i, v) - lower) / width, 0, 1),
    all zeros for a degenerate band. `band` is a fixed Band, or a LiveBand placed from these rows' scores and joint
    gradient norms. No host sync: non-finite gradients are flagged in `finite`, and GradientRouter.finish refuses
    them before any knob gradient is written.
    """
    if isinstance(policy_loss_grads, ModuleRows):
        grads = policy_loss_grads
        check_module_ranks(grads, direction)
    else:
        check_module_grads(policy_loss_grads, direction)
        grads = ModuleRows.of(policy_loss_grads)
    flat = grads.rows
    # cos(-g, v) = cos(g, -v): negate the (k, R) direction, not the (n, R) gradients (n = tokens, per token)
    scores = flat_direction_scores(flat, -ModuleRows.of(direction, grads.modules).rows)
    if not isinstance(band, Band):
        band = band(scores, torch.linalg.vector_norm(flat, dim=1))  # the router's masses (GradientRouter._add_units)
    return GateResult(weights=band.weights(scores), scores=scores, band=band, grads=grads,
                      finite=torch.isfinite(flat).all())


def check_module_ranks(grads: ModuleRows, direction: Mapping[str, torch.Tensor]) -> None:
    """Side-by-side rows must have exactly the direction's modules, each with the direction's rank."""
    if set(grads.modules) != set(direction) or len(grads.modules) != len(direction):
        raise ValueError(f"gradients must have exactly the direction's modules (got {len(grads.modules)} modules, "
                         f"e.g. {list(grads.modules)[:3]}; direction {list(direction)[:3]})")
    for name, rank in zip(grads.modules, grads.ranks):
        if rank != direction[name].shape[-1]:
            raise ValueError(f"{name}: gradients have {rank} columns, the direction {direction[name].shape[-1]}")
    if grads.rows.dim() != 2 or grads.rows.shape[1] != sum(grads.ranks):
        raise ValueError(f"gradient rows have shape {tuple(grads.rows.shape)}, should be (n, {sum(grads.ranks)})")
