"""The knobs' optimizer: AdamW whose update conserves, so that routing changes what is quarantined, never how the
model trains.

Each knob is (r, 1 + Q): column 0 the effective knob s (the one the model trains on), column j a quarantine q_j.
Its gradient holds, per column, the total gradient g (column 0) and router j's routed share g_j = sum_i w_ij g_i
(column j). With lr_t the scheduled learning rate, per entry:

    m_0 <- b1 m_0 + (1 - b1) g            m_j <- b1 m_j + (1 - b1) g_j       (one first moment per column)
    v   <- b2 v   + (1 - b2) g^2                                              (ONE second moment, of g)
    denom = sqrt(v / (1 - b2^t)) + eps
    s   <- s (1 - lr_t wd) - lr_t / (1 - b1^t) * m_0 / denom
    q_j <- q_j (1 - lr_t wd) - lr_t / (1 - b1^t) * m_j / denom

Column 0 is stock `torch.optim.AdamW` on the total gradient, op for op (bit-identical: tests/test_routing_optimizer.py),
so the model trains exactly as vanilla does whatever is routed. Router j's kept knob k_j = s - q_j moves by the same
rule with first moment m_0 - m_j, the moment of its kept gradient g - g_j: the kept and quarantine updates of each
router add up to vanilla's update (linearity of the first moment, the shared denominator, decoupled weight decay per
column). A quarantine that receives no routed gradient stays exactly 0.

Clipping (`clip_grad_norm_`) scales every column by one coefficient computed from the norm of the effective
gradient g over all knobs and all data-parallel ranks, so clipping too is vanilla's.

`PerRowAdamW` is the ablation: the kept and one quarantine knob as two independent AdamW rows (each
its own second moment), clipped on their joint norm. Its knob-on update is not vanilla's (at step 1 it is about
1.6 times vanilla's norm on the random gradients of tests/test_routing_optimizer.py), so a route2b run under it
trains faster than vanilla and its comparison with vanilla is confounded. It stays only to reproduce runs made with
it.

Both work on each knob's local tensor (a DTensor's shard under FSDP2: rows of r, every column of an entry on one
rank), batched with torch's foreach kernels; their state is plain tensors that verl's checkpoint saves per rank.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim.adamw import adamw

# all-reduce SUM of a tensor over the ranks that share the knobs' shards; returns the reduced tensor
Reduce = Callable[[torch.Tensor], torch.Tensor]
OPTIMIZERS = ("conserving_adamw", "per_row_adamw")
# torch AdamW options these optimizers do not have (their update would not be the one documented above)
_REFUSED_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class QuarantineAdamW(torch.optim.Optimizer):
    """AdamW over (r, 1 + Q) knobs with one first moment per column and one second moment from the effective
    gradient (column 0): the conserving update of the module docstring.

    lr, betas, eps, weight_decay: as torch.optim.AdamW (torch's defaults). `foreach` and `fused` are accepted for
    compatibility with verl's `override_optimizer_config` and ignored: the update is always batched with foreach
    kernels (a fused kernel has no shared second moment).
    """

    def __init__(self, knobs: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, **refused) -> None:
        bad = sorted(k for k, v in refused.items() if k in _REFUSED_OPTIONS and v) + \
            sorted(k for k in refused if k not in _REFUSED_OPTIONS)
        if bad:
            raise ValueError(f"{type(self).__name__} does not take {bad}: the knobs' update is plain AdamW "
                             "(lr, betas, eps, weight_decay)")
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"lr={lr}, eps={eps}, weight_decay={weight_decay}: each must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas}: each must lie in [0, 1)")
        super().__init__(knobs, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for knob in group["params"]:
                if knob.dim() != 2:
                    raise ValueError(f"{type(self).__name__} trains (r, 1 + Q) knobs; got a tensor of shape "
                                     f"{tuple(knob.shape)}")

    # --- the rule's two halves ---------------------------------------------------------------------------------

    def _norm_columns(self, grad: torch.Tensor) -> torch.Tensor:
        """The columns of a local gradient whose norm clipping bounds: the effective gradient."""
        return grad[:, :1]

    def _init_state(self, knob: torch.Tensor) -> dict:
        local = local_tensor(knob)
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(local, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(local[:, :1], memory_format=torch.contiguous_format)}

    def _update(self, group: dict, knobs: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        step = _advance(states)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if weight_decay != 0:
            torch._foreach_mul_(knobs, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        effective = [grad[:, :1] for grad in grads]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, effective, effective, 1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, bias_correction2_sqrt)
        torch._foreach_add_(denominators, eps)
        # (r, 1) denominators broadcast over the columns: every column divides by the effective gradient's moment
        torch._foreach_addcdiv_(knobs, exp_avgs, denominators, -(lr / bias_correction1))

    # --- torch.optim.Optimizer -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure")
        for group in self.param_groups:
            knobs, grads, states = [], [], []
            for knob in group["params"]:
                if knob.grad is None:
                    continue
                state = self.state[knob]
                if not state:
                    state.update(self._init_state(knob))
                knobs.append(local_tensor(knob))
                grads.append(local_tensor(knob.grad))
                states.append(state)
            if knobs:
                self._update(group, knobs, grads, states)
        return None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, reduce: Optional[Reduce] = None) -> torch.Tensor:
        """Scale every knob's gradient (all columns) by min(1, max_norm / (norm + 1e-6)), torch's rule, where norm is
        the L2 norm of the rule's clipped columns over all knobs and, through `reduce` (an all-reduce SUM over the
        ranks sharing the shards), all ranks. Returns the norm before clipping (a 0-dim tensor on the knobs'
        device; non-finite when a gradient is)."""
        grads = [local_tensor(k.grad) for group in self.param_groups for k in group["params"] if k.grad is not None]
        if not grads:
            raise RuntimeError("no knob has a gradient to clip")
        columns = [self._norm_columns(grad) for grad in grads]
        # torch.nn.utils.clip_grad_norm_'s own arithmetic (per-tensor norms, then the norm of those), so that one rank
        # clips exactly as stock training does; across ranks, the shards' squared norms are summed
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(columns)))
        if reduce is not None:
            norm = reduce(norm.double().square()).sqrt().to(norm.dtype)
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient)
        return norm

    @torch.no_grad()
    def column_norms(self, reduce: Optional[Reduce] = None) -> torch.Tensor:
        """The L2 norm of each knob column (the effective knob s, then each quarantine q_j) over all knobs and,
        through `reduce`, all ranks: a (1 + Q,) float64 tensor on the knobs' device."""
        values = [local_tensor(k).detach() for group in self.param_groups for k in group["params"]]
        squares = torch.cat([v.reshape(-1, v.shape[-1]) for v in values]).double().square().sum(0)
        if reduce is not None:
            squares = reduce(squares)
        return squares.sqrt()


class PerRowAdamW(QuarantineAdamW):
    """The ablation: the kept knob k = s - q and one quarantine q as two independent AdamW rows (first AND second
    moment per row, from the kept gradient g - g_q and the routed g_q), clipped on their joint norm. Not conserving:
    see the module docstring. Knobs must have exactly one quarantine column."""

    def __init__(self, knobs: Iterable[nn.Parameter], **options) -> None:
        super().__init__(knobs, **options)
        for group in self.param_groups:
            for knob in group["params"]:
                if knob.shape[1] != 2:
                    raise ValueError(f"per-row AdamW updates a kept and ONE quarantine knob; a knob has "
                                     f"{knob.shape[1] - 1} quarantines")

    def _norm_columns(self, grad: torch.Tensor) -> torch.Tensor:
        return _kept_and_quarantine(grad)

    def _init_state(self, knob: torch.Tensor) -> dict:
        local = local_tensor(knob)
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(local, memory_format=torch.contiguous_format),
                "exp_avg_sq": torch.zeros_like(local, memory_format=torch.contiguous_format)}

    def _update(self, group: dict, knobs: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        rows = [_kept_and_quarantine(knob) for knob in knobs]
        row_grads = [_kept_and_quarantine(grad) for grad in grads]
        # torch's own AdamW on the two rows (it counts the steps)
        adamw(rows, row_grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                [], [s["step"] for s in states], foreach=True, amsgrad=False, beta1=beta1,
                                beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
        for knob, row in zip(knobs, rows):  # s = k + q, q as stepped
            knob.copy_(torch.stack([row[:, 0] + row[:, 1], row[:, 1]], dim=1))


def _kept_and_quarantine(columns: torch.Tensor) -> torch.Tensor:
    """(r, 2) [effective, quarantine] -> (r, 2) [kept = effective - quarantine, quarantine]."""
    return torch.stack([columns[:, 0] - columns[:, 1], columns[:, 1]], dim=1)


def _advance(states: list[dict]) -> float:
    """Count one more step in every state (they step together) and return it, as a float like torch's `step`."""
    torch._foreach_add_([state["step"] for state in states], 1.0)
    return float(states[0]["step"].item())


def build_knob_optimizer(name: str, knobs: Iterable[nn.Parameter], **options) -> QuarantineAdamW:
    """The knobs' optimizer by name (gq.optimizer): `conserving_adamw` (the default) or `per_row_adamw` (ablation)."""
    classes = {"conserving_adamw": QuarantineAdamW, "per_row_adamw": PerRowAdamW}
    if name not in classes:
        raise ValueError(f"knob optimizer {name!r}: one of {list(classes)}")
    return classes[name](knobs, **options)
