"""Assemble the kept and quarantine knob gradients from stashed per-example gradients and gate weights.

kept = sum_u (1 - w_u) g_u, quarantine = sum_u w_u g_u over gate units u, accumulated over micro-batches. Units are
rollouts (granularity "rollout"), or, per token, each stashed response token t with its own w_t plus each rollout's
remainder R_i = g_i - sum_{t in i} g_t (its positions outside the stashed tokens: prompt and padding-free context)
with the rollout's w_i. Either way sum_u g_u = sum_i g_i, so kept + quarantine = the vanilla gradient exactly.

frout, the routed fraction of gradient mass, is sum_u w_u ||g_u|| / sum_u ||g_u|| with ||.|| the joint norm over
all modules (0 when no gradient mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from verl_gq.adapter.layer import KEEP, QUARANTINE
from verl_gq.adapter.model import QuarantineAdapter
from verl_gq.routing.gate import GateResult

# all-reduce SUM of a flat tensor across data-parallel ranks; returns the reduced tensor.
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RoutedGradients:
    """Full (unsharded) per-module (2, r) gradients of the knobs (row KEEP: kept, row QUARANTINE: quarantine), shaped
    like each layer's `knobs`, and the step's routing metrics."""

    knob_grads: dict[str, torch.Tensor]
    metrics: dict[str, float]

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        return {name: grad[KEEP] for name, grad in self.knob_grads.items()}

    @property
    def quarantine(self) -> dict[str, torch.Tensor]:
        return {name: grad[QUARANTINE] for name, grad in self.knob_grads.items()}


class GradientRouter:
    """Accumulates routed gradients over the micro-batches of one optimizer step; `finish` reduces and returns them."""

    def __init__(self, module_names: Sequence[str]) -> None:
        if not module_names:
            raise ValueError("a router needs at least one module")
        self.module_names = list(module_names)
        self._reset()

    def _reset(self) -> None:
        # module-flattened (sum_m r_m,) accumulators, columns in module_names order
        self._kept: Optional[torch.Tensor] = None
        self._quarantine: Optional[torch.Tensor] = None
        self._ranks: list[int] = []
        self._mass: list[torch.Tensor] = []  # [routed, total] gradient mass
        self._n_examples = 0
        self._n_gated = 0
        self._n_degenerate = 0
        self._n_nonfinite: Optional[torch.Tensor] = None  # gate results with a NaN/inf row, counted on the device
        self._scores: list[torch.Tensor] = []
        self._token_scores: list[torch.Tensor] = []
        self._last_band = None

    def add(self, rollout_gate: GateResult) -> None:
        """Rollout granularity: one micro-batch's gated rollouts."""
        self._check(rollout_gate, "rollout")
        self._add_units(rollout_gate.grads.rows, rollout_gate.weights)
        self._count(rollout_gate)
        self._scores.append(rollout_gate.scores.detach())

    def add_tokens(self, rollout_gate: GateResult, token_gate: GateResult, example_of_token: torch.Tensor) -> None:
        """Token granularity: stashed tokens get their own w_t; the rest of each rollout gets the rollout's w_i.
        example_of_token (tokens,): the rollout (row of rollout_gate) each token row belongs to."""
        self._check(rollout_gate, "rollout")
        self._check(token_gate, "token")
        if example_of_token.shape != token_gate.weights.shape:
            raise ValueError(f"example_of_token {tuple(example_of_token.shape)} should match the token gate's weights")
        examples, tokens = rollout_gate.grads.rows, token_gate.grads.rows
        remainder = examples - torch.zeros_like(examples).index_add_(0, example_of_token.to(examples.device), tokens)
        self._add_units(remainder, rollout_gate.weights)
        self._add_units(tokens, token_gate.weights)
        self._count(rollout_gate, token_gate)
        self._scores.append(rollout_gate.scores.detach())
        self._token_scores.append(token_gate.scores.detach())

    def finish(self, reduce: Optional[Reduce] = None, grad_scale: float = 1.0) -> RoutedGradients:
        """Reduce across ranks, scale, return the routed gradients and metrics, and start a new step.

        reduce: all-reduce SUM over data-parallel ranks of ONE flat tensor (both knobs' gradients and the metric
        sums travel together, one collective). grad_scale multiplies the reduced gradients, e.g. 1/world_size to
        match FSDP's gradient averaging. Score percentiles are over this rank's units only.
        """
        knob_grads, names, scalars = self._reduce_on_device(reduce, grad_scale)
        values = dict(zip(names, scalars.tolist()))  # the step's one host sync: every metric at once
        if values["n_nonfinite"]:
            self._reset()
            raise ValueError(f"policy-loss gradients contain NaN/inf ({values['n_nonfinite']:.0f} of "
                             f"{values['n_gated']:.0f} gated micro-batches, over all ranks): the loss should be "
                             "finite; no knob gradient was written")
        n_gated, total_mass = values["n_gated"], values["total_mass"]
        metrics = {
            "frout": values["routed_mass"] / total_mass if total_mass > 0 else 0.0,
            "n_examples": values["n_examples"],
            "band_degenerate_fraction": values["n_degenerate"] / n_gated if n_gated else 0.0,
            "keep_grad_norm": values["keep_grad_norm"],
            "quarantine_grad_norm": values["quarantine_grad_norm"],
        }
        if self._last_band is not None:
            metrics.update(
                band_lower=self._last_band.lower, band_upper=self._last_band.upper, band_width=self._last_band.width
            )
        metrics.update({name: value for name, value in values.items() if name.startswith(SCORE_PREFIXES)})
        per_module = dict(zip(self.module_names, knob_grads.split(self._ranks, dim=1)))
        self._reset()
        return RoutedGradients(per_module, metrics)

    def _reduce_on_device(self, reduce: Optional[Reduce], grad_scale: float
                          ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """finish's device half, with no host sync (tests run it on the meta device, where a host read raises): the
        reduced and scaled (2, sum r) gradients (rows KEEP and QUARANTINE), the metrics' names, and their values in
        one float64 tensor in that order."""
        if self._kept is None:
            raise RuntimeError("nothing to finish: add at least one micro-batch")
        reference = self._kept
        # host ints: a non-blocking copy, no wait for the device
        counts = torch.tensor([self._n_examples, self._n_gated, self._n_degenerate], dtype=reference.dtype)
        counts = torch.cat([counts.to(reference.device, non_blocking=True),
                            self._n_nonfinite.to(reference.dtype).reshape(1)])
        flat = torch.cat([self._kept, self._quarantine, torch.stack(self._mass).to(reference.dtype), counts])
        if reduce is not None:
            reduced = reduce(flat)
            if reduced.shape != flat.shape:
                raise ValueError(f"reduce returned shape {tuple(reduced.shape)}, should be {tuple(flat.shape)}")
            flat = reduced
        total_rank = sum(self._ranks)
        # rows KEEP = 0 and QUARANTINE = 1: the order _kept and _quarantine went into flat
        knob_grads = flat[: 2 * total_rank].view(2, total_rank) * grad_scale
        norms = knob_grads.double().norm(dim=1)
        named = {  # names -> their values, side by side
            ("routed_mass", "total_mass", "n_examples", "n_gated", "n_degenerate", "n_nonfinite"):
                flat[2 * total_rank :].double(),
            ("keep_grad_norm", "quarantine_grad_norm"): norms,
        }
        for prefix, scores in zip(SCORE_PREFIXES, (self._scores, self._token_scores)):
            stats = _score_stats(scores)
            if stats is not None:
                named[tuple(f"{prefix}_{stat}" for stat in SCORE_STATS)] = stats
        names = [name for group in named for name in group]
        return knob_grads, names, torch.cat(list(named.values()))

    def _check(self, result: GateResult, what: str) -> None:
        if list(result.grads.modules) != self.module_names:
            raise ValueError(f"the {what} gate's gradients must be keyed by exactly the router's modules, in order")
        self._ranks = list(result.grads.ranks)

    def _add_units(self, grads: torch.Tensor, weights: torch.Tensor) -> None:
        """grads (units, sum_r) module-flattened, weights (units,)."""
        w = weights.to(grads.dtype)
        kept, quarantine = (1 - w) @ grads, w @ grads
        mass = torch.linalg.vector_norm(grads, dim=1)  # no (units x sum_r) temporary: per token that is GBs at r=full
        routed, total = (w * mass).sum(), mass.sum()
        if self._kept is None:
            self._kept, self._quarantine, self._mass = kept, quarantine, [routed, total]
        else:
            self._kept = self._kept + kept
            self._quarantine = self._quarantine + quarantine
            self._mass = [self._mass[0] + routed, self._mass[1] + total]

    def _count(self, rollout_gate: GateResult, *more: GateResult) -> None:
        nonfinite = (~torch.stack([g.finite for g in (rollout_gate, *more)]).all()).long()  # this micro-batch: 0/1
        self._n_nonfinite = nonfinite if self._n_nonfinite is None else self._n_nonfinite + nonfinite
        self._n_examples += rollout_gate.grads.rows.shape[0]
        self._n_gated += 1
        self._n_degenerate += int(rollout_gate.band.degenerate)
        self._last_band = rollout_gate.band


@torch.no_grad()
def write_knob_grads(adapter: QuarantineAdapter, routed: RoutedGradients) -> None:
    """Default writer for plain (non-DTensor) knobs: the routed gradients become each layer's `knobs.grad`, replacing
    whatever is there (autograd's unrouted totals under `knob_gradient_totals`). Under FSDP2 the knobs are DTensors
    and the engine must place the full tensors on their shards itself."""
    for name, layer in adapter.layers.items():
        parameter, grad = layer.knobs, routed.knob_grads[name]
        if hasattr(parameter, "device_mesh"):
            raise TypeError(f"{name}: knob is a DTensor; the engine must place routed gradients on its shards")
        if grad.shape != parameter.shape:
            raise ValueError(f"{name}: routed gradient {tuple(grad.shape)} does not fit knob {tuple(parameter.shape)}")
        parameter.grad = grad.to(device=parameter.device, dtype=parameter.dtype, copy=True)


SCORE_PREFIXES = ("cos", "token_cos")  # the rollout and the token gate's cosine statistics
SCORE_STATS = ("mean", "std", "min", "max", "p10", "p50", "p90")


def _score_stats(scores: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """SCORE_STATS of the scores as one float64 tensor on their device, or None for no scores (known from shapes)."""
    if sum(s.numel() for s in scores) == 0:
        return None
    values = torch.cat(scores).double()
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).to(values.device, non_blocking=True)
    moments = torch.stack([values.mean(), values.std(correction=0), values.amin(), values.amax()])
    return torch.cat([moments, torch.quantile(values, q)])
