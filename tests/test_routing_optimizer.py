"""The knobs' optimizer conserves the update (float64, CPU): the effective knob steps exactly as stock AdamW on the
total gradient whatever the routers route, each router's kept and quarantine knobs follow the shared-moment rule,
a quarantine that receives nothing stays exactly 0, clipping is vanilla's, and a resumed optimizer continues exactly.
The per-row ablation is shown NOT to conserve, so the conservation tests are tests that can fail."""

from __future__ import annotations

import math

import pytest
import torch

from verl_gq.routing.optimizer import PerRowAdamW, QuarantineAdamW, build_knob_optimizer

RANKS = (5, 3, 7)  # three knobs of different ranks
STEPS = 12
LR = 1e-2
BETAS = (0.9, 0.99)
MAX_NORM = 0.5  # the random gradients' norms are ~3-5: clipping is active on every step
WARMUP = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def schedule(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay, as verl's cosine schedule."""
    def factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, STEPS - WARMUP)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def routed_gradients(n_routers: int, seed: int = 0, silent: tuple[int, ...] = ()):
    """Per step, per knob: (total gradient (r,), [router j's routed share (r,)]) from 6 random units and random gate
    weights in [0, 1] per router (routers in `silent` route nothing)."""
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        knobs = []
        for rank in RANKS:
            units = torch.randn(6, rank, generator=generator, dtype=torch.float64) * 1.5
            weights = torch.rand(n_routers, 6, generator=generator, dtype=torch.float64)
            weights[list(silent)] = 0.0
            knobs.append((units.sum(0), [w @ units for w in weights]))
        steps.append(knobs)
    return steps


def run_knobs(optimizer_class, n_routers: int, weight_decay: float, clip: bool = True, silent=(), stop_after=None,
              state=None):
    """Knob values (r, 1 + R) after the steps (from `state` if given: (knob values, optimizer and schedule state dicts,
    step))."""
    knobs = [torch.nn.Parameter(torch.zeros(rank, 1 + n_routers, dtype=torch.float64)) for rank in RANKS]
    optimizer = optimizer_class(knobs, lr=LR, betas=BETAS, weight_decay=weight_decay)
    scheduler = schedule(optimizer)
    start = 0
    if state is not None:
        values, optimizer_state, scheduler_state, start = state
        with torch.no_grad():
            for knob, value in zip(knobs, values):
                knob.copy_(value)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    for step, grads in enumerate(routed_gradients(n_routers, silent=silent)):
        if step < start:
            continue
        for knob, (total, routed) in zip(knobs, grads):
            knob.grad = torch.stack([total, *routed], dim=1)
        if clip:
            optimizer.clip_grad_norm_(MAX_NORM)
        optimizer.step()
        scheduler.step()
        if stop_after is not None and step + 1 == stop_after:
            return [k.detach().clone() for k in knobs], optimizer.state_dict(), scheduler.state_dict(), stop_after
    return [k.detach().clone() for k in knobs]


def stock_effective(weight_decay: float, foreach: bool, clip: bool = True, n_routers: int = 3):
    """Stock torch AdamW (and clip_grad_norm_) on the total gradients alone."""
    params = [torch.nn.Parameter(torch.zeros(rank, dtype=torch.float64)) for rank in RANKS]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=weight_decay, foreach=foreach)
    scheduler = schedule(optimizer)
    for grads in routed_gradients(n_routers):
        for param, (total, _) in zip(params, grads):
            param.grad = total.clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        optimizer.step()
        scheduler.step()
    return [p.detach().clone() for p in params]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    diff = max((g - e).abs().max().item() for g, e in zip(got, expected))
    return diff / max(e.abs().max().item() for e in expected)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True], ids=["stock_single_tensor", "stock_foreach"])
def test_vanilla_knobs_step_bit_identically_to_stock_adamw(weight_decay, foreach):
    """No router routes anything: the effective column is stock AdamW's parameter bit for bit (clipping and schedule
    included), and every quarantine column stays exactly 0 (weight decay of 0 is 0)."""
    knobs = run_knobs(QuarantineAdamW, n_routers=3, weight_decay=weight_decay, silent=(0, 1, 2))
    stock = stock_effective(weight_decay, foreach)
    for knob, param in zip(knobs, stock):
        assert torch.equal(knob[:, 0], param), f"effective knob differs from stock AdamW by " \
                                              f"{(knob[:, 0] - param).abs().max().item():.3e}"
        assert torch.equal(knob[:, 1:], torch.zeros_like(knob[:, 1:])), "an unrouted quarantine must stay exactly 0"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_effective_knob_is_stock_adamw_on_the_total_gradient_whatever_is_routed(weight_decay):
    """Three routers route random shares of random units every step; the model's knob (the effective column) still
    equals stock AdamW on the total gradient: routing changes what is quarantined, never how the model trains."""
    knobs = run_knobs(QuarantineAdamW, n_routers=3, weight_decay=weight_decay)
    error = relative_error([k[:, 0] for k in knobs], stock_effective(weight_decay, foreach=True))
    assert error <= 1e-12, f"the effective knob drifted from stock AdamW on the summed gradient ({error:.2e} relative)"
    assert all(k[:, 1:].abs().max() > 1e-3 for k in knobs), "the routers should have moved their quarantines"


def reference_kept_and_quarantine(weight_decay: float, router: int, n_routers: int = 3):
    """The rule written out per entry in plain float64 for one router: kept k = s - q and quarantine q each with its
    own first moment (of its own gradient), ONE second moment of the total gradient, torch's bias correction and eps
    placement, decoupled weight decay per knob; clipping on the total's norm scales both gradients alike."""
    (b1, b2), eps = BETAS, 1e-8
    kept = [torch.zeros(rank, dtype=torch.float64) for rank in RANKS]
    quarantine = [torch.zeros(rank, dtype=torch.float64) for rank in RANKS]
    m_kept = [torch.zeros(rank, dtype=torch.float64) for rank in RANKS]
    m_quarantine = [torch.zeros(rank, dtype=torch.float64) for rank in RANKS]
    v = [torch.zeros(rank, dtype=torch.float64) for rank in RANKS]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)  # only to drive the schedule
    scheduler = schedule(optimizer)
    for step, grads in enumerate(routed_gradients(n_routers), start=1):
        lr = optimizer.param_groups[0]["lr"]
        total_norm = math.sqrt(sum(float(total.square().sum()) for total, _ in grads))
        coefficient = min(1.0, MAX_NORM / (total_norm + 1e-6))
        for i, (total, routed) in enumerate(grads):
            g_quarantine = routed[router] * coefficient
            g_total = total * coefficient
            g_kept = g_total - g_quarantine
            m_kept[i] = b1 * m_kept[i] + (1 - b1) * g_kept
            m_quarantine[i] = b1 * m_quarantine[i] + (1 - b1) * g_quarantine
            v[i] = b2 * v[i] + (1 - b2) * g_total**2
            denominator = (v[i] / (1 - b2**step)).sqrt() + eps
            kept[i] = kept[i] * (1 - lr * weight_decay) - lr / (1 - b1**step) * m_kept[i] / denominator
            quarantine[i] = quarantine[i] * (1 - lr * weight_decay) - lr / (1 - b1**step) * m_quarantine[i] / denominator
        optimizer.step()
        scheduler.step()
    return kept, quarantine


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_each_routers_kept_and_quarantine_knobs_follow_the_shared_moment_rule(weight_decay):
    knobs = run_knobs(QuarantineAdamW, n_routers=3, weight_decay=weight_decay)
    for router in range(3):
        kept, quarantine = reference_kept_and_quarantine(weight_decay, router)
        got_quarantine = [k[:, 1 + router] for k in knobs]
        got_kept = [k[:, 0] - k[:, 1 + router] for k in knobs]
        assert relative_error(got_quarantine, quarantine) <= 1e-12, f"router {router}: quarantine knob off the rule"
        assert relative_error(got_kept, kept) <= 1e-12, f"router {router}: kept knob (effective - quarantine) off the rule"


def test_per_row_adamw_does_not_conserve_the_update():
    """The ablation (kept and quarantine knobs each with its own second moment, clipped on their joint norm) trains a
    different model than vanilla under the same routed gradients: the conservation check above fails for it."""
    knobs = run_knobs(PerRowAdamW, n_routers=1, weight_decay=0.1)
    stock = stock_effective(0.1, foreach=True, n_routers=1)
    error = relative_error([k[:, 0] for k in knobs], stock)
    assert error > 0.05, f"per-row AdamW should move the effective knob away from vanilla's (only {error:.2e})"
    one_step = run_knobs(PerRowAdamW, n_routers=1, weight_decay=0.0, clip=False, stop_after=1)[0]
    vanilla_step = run_knobs(QuarantineAdamW, n_routers=1, weight_decay=0.0, clip=False, stop_after=1)[0]
    ratio = torch.cat([k[:, 0] for k in one_step]).norm() / torch.cat([k[:, 0] for k in vanilla_step]).norm()
    print(f"per-row AdamW: effective knob {error:.3f} relative from vanilla after {STEPS} steps; step-1 update "
          f"{ratio:.2f}x vanilla's norm")
    assert ratio > 1.2, "Adam's per-row normalisation should make the first knob-on update larger than vanilla's"


def test_resumed_optimizer_continues_exactly():
    """State dict after 5 steps, loaded into a fresh optimizer over knobs restored to the same values: the remaining
    steps land bit for bit where an uninterrupted run does (what verl's checkpoint resume relies on)."""
    uninterrupted = run_knobs(QuarantineAdamW, n_routers=2, weight_decay=0.1)
    saved = run_knobs(QuarantineAdamW, n_routers=2, weight_decay=0.1, stop_after=5)
    resumed = run_knobs(QuarantineAdamW, n_routers=2, weight_decay=0.1, state=saved)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


def test_clipping_reads_the_effective_gradient_only():
    """Huge routed shares in the quarantine columns do not trigger clipping: the norm is the total gradient's."""
    knob = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    optimizer = QuarantineAdamW([knob], lr=LR)
    knob.grad = torch.tensor([[0.1, 50.0, -80.0]] * 4, dtype=torch.float64)
    norm = optimizer.clip_grad_norm_(1.0)
    assert norm.item() == pytest.approx(0.2) and torch.equal(knob.grad[:, 1], torch.full((4,), 50.0, dtype=torch.float64))
    knob.grad = torch.tensor([[3.0, 1.0, 2.0]] * 4, dtype=torch.float64)
    optimizer.clip_grad_norm_(1.0)
    assert knob.grad[:, 0].norm().item() == pytest.approx(1.0, abs=1e-6), "clipped to max_norm"
    assert torch.allclose(knob.grad[:, 1] / knob.grad[:, 0], torch.full((4,), 1 / 3, dtype=torch.float64)), \
        "every column scaled by the same coefficient"


def test_column_norms_are_each_columns_norm_over_every_knob_and_rank():
    generator = torch.Generator().manual_seed(3)
    knobs = [torch.nn.Parameter(torch.randn(rows, 3, generator=generator, dtype=torch.float64)) for rows in (4, 7, 1)]
    optimizer = QuarantineAdamW(knobs)
    whole = torch.cat([k.detach() for k in knobs])
    expected = torch.stack([whole[:, j].norm() for j in range(3)])
    assert torch.allclose(optimizer.column_norms(), expected, rtol=1e-15, atol=0)
    # two ranks holding equal shards: the squared sums add
    assert torch.allclose(optimizer.column_norms(reduce=lambda t: 2 * t), math.sqrt(2) * expected, rtol=1e-15)


def test_bad_options_and_shapes_fail_clearly():
    knob = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="amsgrad"):
        QuarantineAdamW([knob], amsgrad=True)
    with pytest.raises(ValueError, match=r"\(r, 1 \+ Q\) knobs"):
        QuarantineAdamW([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="ONE quarantine"):
        PerRowAdamW([torch.nn.Parameter(torch.zeros(4, 3))])
    with pytest.raises(ValueError, match="knob optimizer 'sgd'"):
        build_knob_optimizer("sgd", [knob])
    QuarantineAdamW([knob], fused=True, foreach=False)  # verl's override_optimizer_config keys are accepted
