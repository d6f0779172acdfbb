"""Assemble one optimizer step's knob gradients: the total (effective) gradient and each router's quarantine share.

Over the micro-batches of a step, `add_examples` sums every example's stashed gradient into the total
g = sum_i g_i, which the effective knob trains on (vanilla's gradient). Each router r gates the same stash with its
own direction and band and adds its quarantine share q_r = sum_u w_ru g_u over its gate units u: rollouts
(granularity "rollout"), or, per token, each stashed response token with its own w_t plus each rollout's remainder
R_i = g_i - sum_{t in i} g_t (its positions outside the stashed tokens) with the rollout's w_i. Router r's kept
gradient is g - q_r, so kept + quarantine = the total exactly, for every router. A `constant` router routes every
unit at the step's routed fraction of another router: q = frout_other * g.

frout, a router's routed fraction of gradient mass, is sum_u w_u ||g_u|| / sum_u ||g_u|| with ||.|| the joint norm
over all modules (0 when no gradient mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch.distributed.tensor import DTensor

from verl_gq.adapter.layer import EFFECTIVE
from verl_gq.routing.capture import ModuleRows
from verl_gq.routing.gate import GateResult
from verl_gq.routing.metrics import SCORE_STATS, RouterMetrics, ScoreStats, StepMetrics

# all-reduce SUM of a flat tensor across data-parallel ranks; returns the reduced tensor.
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RoutedGradients:
    """Full (unsharded) per-module (r, 1 + R) knob gradients shaped like each layer's `knobs` (column EFFECTIVE: the
    total gradient; column j + 1: router j's quarantine share), the routers in column order, and the step's metrics."""

    knob_grads: dict[str, torch.Tensor]
    routers: tuple[str, ...]
    metrics: StepMetrics

    @property
    def total(self) -> dict[str, torch.Tensor]:
        return {name: grad[:, EFFECTIVE] for name, grad in self.knob_grads.items()}

    def quarantine(self, router: str) -> dict[str, torch.Tensor]:
        column = 1 + self.routers.index(router)
        return {name: grad[:, column] for name, grad in self.knob_grads.items()}

    def kept(self, router: str) -> dict[str, torch.Tensor]:
        column = 1 + self.routers.index(router)
        return {name: grad[:, EFFECTIVE] - grad[:, column] for name, grad in self.knob_grads.items()}


class GradientRouter:
    """Accumulates one step's total gradient and every router's quarantine share over its micro-batches; `finish`
    reduces them across ranks (one collective) and returns the knob gradients and metrics.

    routers: the router names in knob-column order (the adapter's quarantines). constant: {router: other}: routers
    that route every unit at the step's routed fraction of `other` (the constant-w control), resolved at `finish`.
    """

    def __init__(self, module_names: Sequence[str], routers: Sequence[str] = (),
                 constant: Optional[Mapping[str, str]] = None) -> None:
        if not module_names:
            raise ValueError("a router needs at least one module")
        self.module_names = list(module_names)
        self.routers = list(routers)
        if len(set(self.routers)) != len(self.routers):
            raise ValueError(f"router names {self.routers}: a name appears twice")
        self.constant = dict(constant or {})
        for router, other in self.constant.items():
            if router not in self.routers or other not in self.routers or other in self.constant:
                raise ValueError(f"constant router {router!r} follows {other!r}: both must be routers, and {other!r} "
                                 "must gate (not be constant itself)")
        self._reset()

    def _reset(self) -> None:
        self._total: Optional[torch.Tensor] = None  # (sum_m r_m,), columns in module_names order
        self._ranks: list[int] = []
        self._n_examples = 0
        self._n_nonfinite: Optional[torch.Tensor] = None  # micro-batches with a NaN/inf row, counted on the device
        self._quarantine: dict[str, torch.Tensor] = {}
        self._counts: dict[str, list[torch.Tensor]] = {}  # router -> [routed mass, total mass]
        self._gated: dict[str, int] = {}
        self._degenerate: dict[str, torch.Tensor] = {}
        self._scores: dict[str, list[torch.Tensor]] = {}
        self._token_scores: dict[str, list[torch.Tensor]] = {}
        self._last_band: dict[str, torch.Tensor] = {}

    # --- one micro-batch --------------------------------------------------------------------------------------

    def add_examples(self, examples: ModuleRows, tokens: Optional[ModuleRows] = None) -> None:
        """Every example's gradient row of a micro-batch (the stash), once: they sum into the total gradient. The
        token rows, if stashed, only join the finiteness check (the example rows already include them)."""
        if list(examples.modules) != self.module_names:
            raise ValueError("the stashed rows must be keyed by exactly the router's modules, in order")
        self._ranks = list(examples.ranks)
        rows = examples.rows
        total = rows.sum(0)
        self._total = total if self._total is None else self._total + total
        finite = torch.isfinite(rows).all()
        if tokens is not None:
            finite = finite & torch.isfinite(tokens.rows).all()
        nonfinite = (~finite).long()
        self._n_nonfinite = nonfinite if self._n_nonfinite is None else self._n_nonfinite + nonfinite
        self._n_examples += rows.shape[0]

    def add(self, router: str, rollout_gate: GateResult) -> torch.Tensor:
        """Rollout granularity: `router`'s gate of the micro-batch's rollouts. Returns the micro-batch's routed
        fraction of gradient mass (a 0-dim tensor on the device: another router may match it)."""
        self._check(router, rollout_gate)
        routed, total = self._add_units(router, rollout_gate.grads.rows, rollout_gate.weights)
        self._count(router, rollout_gate)
        self._scores.setdefault(router, []).append(rollout_gate.scores.detach())
        return _fraction(routed, total)

    def add_tokens(self, router: str, rollout_gate: GateResult, token_gate: GateResult,
                   example_of_token: torch.Tensor) -> torch.Tensor:
        """Token granularity: stashed tokens get their own w_t; the rest of each rollout gets the rollout's w_i.
        example_of_token (tokens,): the rollout (row of rollout_gate) each token row belongs to. Returns the
        micro-batch's routed fraction, as `add`."""
        self._check(router, rollout_gate)
        self._check(router, token_gate)
        if example_of_token.shape != token_gate.weights.shape:
            raise ValueError(f"example_of_token {tuple(example_of_token.shape)} should match the token gate's weights")
        examples, tokens = rollout_gate.grads.rows, token_gate.grads.rows
        remainder = examples - torch.zeros_like(examples).index_add_(0, example_of_token.to(examples.device), tokens)
        routed_rest, total_rest = self._add_units(router, remainder, rollout_gate.weights)
        routed_tokens, total_tokens = self._add_units(router, tokens, token_gate.weights)
        self._count(router, rollout_gate, token_gate)
        self._scores.setdefault(router, []).append(rollout_gate.scores.detach())
        self._token_scores.setdefault(router, []).append(token_gate.scores.detach())
        return _fraction(routed_rest + routed_tokens, total_rest + total_tokens)

    # --- the step ---------------------------------------------------------------------------------------------

    def finish(self, reduce: Optional[Reduce] = None, grad_scale: float = 1.0) -> RoutedGradients:
        """Reduce across ranks, scale, return the routed gradients and metrics, and start a new step.

        reduce: all-reduce SUM over data-parallel ranks of ONE flat tensor (the gradients and the metric sums travel
        together, one collective). grad_scale multiplies the reduced gradients, e.g. 1/world_size to match FSDP's
        gradient averaging. Score percentiles are over this rank's units only.
        """
        knob_grads, names, scalars = self._reduce_on_device(reduce, grad_scale)
        values = dict(zip(names, scalars.tolist()))  # the step's one host sync: every metric at once
        try:
            if values["n_nonfinite"]:
                raise ValueError(f"policy-loss gradients contain NaN/inf ({values['n_nonfinite']:.0f} micro-batches "
                                 "over all ranks): the loss should be finite; no knob gradient was written")
            metrics = self._metrics(values)
            # (1 + R, sum r) -> (sum r, 1 + R) once: each module's (r, 1 + R) gradient is then a contiguous block
            per_module = dict(zip(self.module_names, knob_grads.T.contiguous().split(self._ranks, dim=0)))
            return RoutedGradients(per_module, tuple(self.routers), metrics)
        finally:
            self._reset()

    def _metrics(self, values: dict[str, float]) -> StepMetrics:
        routers = {}
        for router in self.routers:
            routed, total = values[f"{router}/routed_mass"], values[f"{router}/total_mass"]
            gated = values[f"{router}/gated"]
            routers[router] = RouterMetrics(
                frout=routed / total if total > 0 else 0.0,
                kept_grad_norm=values[f"{router}/kept_grad_norm"],
                quarantine_grad_norm=values[f"{router}/quarantine_grad_norm"],
                band_degenerate_fraction=values[f"{router}/degenerate"] / gated if gated else 0.0,
                band_lower=values.get(f"{router}/band_lower"),
                band_upper=values.get(f"{router}/band_upper"),
                cos=_stats(values, f"{router}/cos"),
                token_cos=_stats(values, f"{router}/token_cos"),
            )
        return StepMetrics(n_examples=values["n_examples"], total_grad_norm=values["total_grad_norm"],
                           routers=routers)

    def _reduce_on_device(self, reduce: Optional[Reduce], grad_scale: float
                          ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """finish's device half, with no host sync (tests run it on the meta device, where a host read raises): the
        reduced and scaled (1 + R, sum r) gradients (row 0 the total, row j + 1 router j's quarantine), the metrics'
        names, and their values in one float64 tensor in that order."""
        if self._total is None:
            raise RuntimeError("nothing to finish: add at least one micro-batch")
        missing = [r for r in self.routers if r not in self.constant and r not in self._counts]
        if missing:
            raise RuntimeError(f"routers {missing} gated no micro-batch this step")
        reference = self._total
        zeros = torch.zeros_like(reference)
        gated = [r for r in self.routers if r not in self.constant]
        host = [self._n_examples] + [self._gated[r] for r in gated]
        # host ints: a non-blocking copy, no wait for the device
        counts = torch.tensor(host, dtype=reference.dtype).to(reference.device, non_blocking=True)
        per_router = [x.to(reference.dtype).reshape(1) for r in gated for x in (*self._counts[r], self._degenerate[r])]
        flat = torch.cat([reference, *[self._quarantine.get(r, zeros) for r in self.routers], *per_router, counts,
                          self._n_nonfinite.to(reference.dtype).reshape(1)])
        if reduce is not None:
            reduced = reduce(flat)
            if reduced.shape != flat.shape:
                raise ValueError(f"reduce returned shape {tuple(reduced.shape)}, should be {tuple(flat.shape)}")
            flat = reduced
        width = reference.shape[0]
        grads = flat[: (1 + len(self.routers)) * width].view(1 + len(self.routers), width) * grad_scale
        scalars = flat[(1 + len(self.routers)) * width:].double()
        per_router_values = scalars[: 3 * len(gated)].view(-1, 3) if gated else scalars[:0].view(0, 3)
        mass = {router: row[:2] for router, row in zip(gated, per_router_values)}
        count_values = scalars[3 * len(gated):]
        named: dict[tuple[str, ...], torch.Tensor] = {
            ("n_examples",): count_values[:1],
            ("n_nonfinite",): count_values[-1:],
            ("total_grad_norm",): grads[0].double().norm().reshape(1),
        }
        for index, router in enumerate(gated):
            named[(f"{router}/routed_mass", f"{router}/total_mass", f"{router}/degenerate")] = per_router_values[index]
            named[(f"{router}/gated",)] = count_values[1 + index: 2 + index]
            named[(f"{router}/band_lower", f"{router}/band_upper")] = self._last_band[router]
        for column, router in enumerate(self.routers, start=1):
            if router in self.constant:  # every unit at the other router's global routed fraction of this step
                routed, total = mass[self.constant[router]].unbind(0)
                fraction = _fraction(routed, total)
                grads[column] = fraction.to(grads.dtype) * grads[0]
                named[(f"{router}/routed_mass", f"{router}/total_mass", f"{router}/degenerate", f"{router}/gated")] = \
                    torch.stack([fraction, torch.ones_like(fraction), torch.zeros_like(fraction), torch.zeros_like(fraction)])
            quarantine = grads[column].double()
            named[(f"{router}/kept_grad_norm", f"{router}/quarantine_grad_norm")] = torch.stack(
                [(grads[0].double() - quarantine).norm(), quarantine.norm()])
            for prefix, scores in (("cos", self._scores.get(router, [])), ("token_cos", self._token_scores.get(router, []))):
                stats = _score_stats(scores)
                if stats is not None:
                    named[tuple(f"{router}/{prefix}/{stat}" for stat in SCORE_STATS)] = stats
        names = [name for group in named for name in group]
        return grads, names, torch.cat([value.reshape(-1).to(torch.float64) for value in named.values()])

    def _check(self, router: str, result: GateResult) -> None:
        if router not in self.routers or router in self.constant:
            raise ValueError(f"{router!r} is not a gating router of this GradientRouter ({self.routers})")
        if list(result.grads.modules) != self.module_names:
            raise ValueError(f"router {router!r}: the gate's gradients must be keyed by exactly the router's modules, "
                             "in order")

    def _add_units(self, router: str, grads: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grads (units, sum_r) module-flattened, weights (units,); returns these units' (routed, total) mass."""
        w = weights.to(grads.dtype)
        quarantine = w @ grads
        mass = torch.linalg.vector_norm(grads, dim=1)  # no (units x sum_r) temporary: per token that is GBs at r=full
        routed, total = (w * mass).sum(), mass.sum()
        if router not in self._quarantine:
            self._quarantine[router], self._counts[router] = quarantine, [routed, total]
        else:
            self._quarantine[router] = self._quarantine[router] + quarantine
            self._counts[router] = [self._counts[router][0] + routed, self._counts[router][1] + total]
        return routed, total

    def _count(self, router: str, rollout_gate: GateResult, *more: GateResult) -> None:
        """Gated micro-batches, degenerate bands among them, and the last band: on the device (a live band's bounds
        are device tensors), read at finish's one sync."""
        band = rollout_gate.band
        device = rollout_gate.weights.device
        degenerate = band.degenerate_flag(device).to(torch.float64)
        self._gated[router] = self._gated.get(router, 0) + 1
        self._degenerate[router] = degenerate + self._degenerate.get(router, 0)
        self._last_band[router] = torch.stack([torch.as_tensor(b, dtype=torch.float64).to(device, non_blocking=True)
                                               for b in (band.lower, band.upper)])


@torch.no_grad()
def write_knob_grads(knobs: Sequence[torch.nn.Parameter], full_grads: Sequence[torch.Tensor]) -> None:
    """Make full (unsharded; after `finish`, identical on every rank) gradients the knobs' gradients, replacing what
    is there (zeros, or autograd's unrouted totals under `knob_gradient_totals`). A plain knob takes the whole
    tensor; a sharded one (an FSDP2 DTensor) this rank's part, in place, and all those copies run as one batched
    kernel: a DTensor op per knob costs ~0.1 ms of host time, and a step writes one knob per adapted module."""
    targets, sources = [], []
    for knob, full in zip(knobs, full_grads, strict=True):
        if full.shape != knob.shape:
            raise ValueError(f"a routed gradient of shape {tuple(full.shape)} does not fit a knob of {tuple(knob.shape)}")
        full = full.to(device=knob.device, dtype=knob.dtype)
        if not isinstance(knob, DTensor):
            knob.grad = full.clone()
            continue
        local = _local_part(full, knob)
        if knob.grad is None:
            knob.grad = DTensor.from_local(local.clone(), knob.device_mesh, knob.placements, run_check=False,
                                           shape=knob.shape, stride=knob.stride())
        else:
            targets.append(knob.grad.to_local())
            sources.append(local)
    if targets:
        torch._foreach_copy_(targets, sources)


def _local_part(full: torch.Tensor, parameter: DTensor) -> torch.Tensor:
    """This rank's part of a full tensor shaped like the DTensor `parameter`, cut as its placements cut it (Shard:
    torch.chunk along the dim, as DTensor and FSDP2 split; Replicate: whole)."""
    local = full
    coordinate = parameter.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(parameter.placements):
        if placement.is_shard():
            pieces = torch.chunk(local, parameter.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            local = pieces[index] if index < len(pieces) else local.narrow(placement.dim, 0, 0)
        elif not placement.is_replicate():
            raise TypeError(f"knob placement {placement} is neither Shard nor Replicate")
    if local.shape != parameter.to_local().shape:
        raise RuntimeError(f"this rank's part of the routed gradient has shape {tuple(local.shape)}, the knob's local "
                           f"shard {tuple(parameter.to_local().shape)} (placements {parameter.placements})")
    return local


def _score_stats(scores: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """SCORE_STATS of the scores as one float64 tensor on their device, or None for no scores (known from shapes)."""
    if sum(s.numel() for s in scores) == 0:
        return None
    values = torch.cat(scores).double()
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).to(values.device, non_blocking=True)
    moments = torch.stack([values.mean(), values.std(correction=0), values.amin(), values.amax()])
    return torch.cat([moments, torch.quantile(values, q)])


def _fraction(routed: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """routed / total on the device, 0 where there is no mass."""
    return torch.where(total > 0, routed / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def _stats(values: dict[str, float], prefix: str) -> Optional[ScoreStats]:
    if f"{prefix}/mean" not in values:
        return None
    return ScoreStats(**{stat: values[f"{prefix}/{stat}"] for stat in SCORE_STATS})
