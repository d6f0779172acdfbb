"""Direction, band, gate and router on a tiny Qwen2 (float64, full-rank knobs): exact pair gradients, a planted hack
pattern gives a positive band and is routed, Haar-random directions give no band, conservation of the gradient,
frout matching, degenerate bands, the no-cheat invariant, and clear errors."""

import inspect
import logging

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_gq.adapter import EFFECTIVE, QuarantineAdapterConfig, inject_quarantine_adapter
from verl_gq.routing import (
    Band,
    GradientRouter,
    KnobGradientCapture,
    ModuleRows,
    Pair,
    Segments,
    assign_folds,
    calibrate_band,
    direction_from_state,
    direction_scores,
    direction_state,
    extract_direction,
    fit_direction_and_band,
    frout_matched_band,
    gate,
    haar_direction,
    pair_gradients,
    write_knob_grads,
)

VOCAB = 97
MARKER = [90] * 10  # the planted "hack": a distinctive completion shared by every hack example
N_PAIRS = 24
HAAR_SEEDS = 50


# tiny matrices run faster on one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def random_ids(generator, n):
    return torch.randint(1, 80, (n,), generator=generator).tolist()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).to(torch.float64).eval()
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank="full"))
    generator = torch.Generator().manual_seed(3)
    pairs = [Pair(random_ids(generator, 5), random_ids(generator, 6), MARKER, "abcd"[i % 4]) for i in range(N_PAIRS)]
    grads = pair_gradients(model, adapter, pairs, micro_batch_size=16)
    folds = assign_folds([p.mode for p in pairs], n_folds=2, seed=0)
    return dict(model=model, adapter=adapter, pairs=pairs, grads=grads, folds=folds, direction=extract_direction(grads))


def micro_batch(rollouts):
    """Right-padded (prompt + response) rows; segments with a per-token stash of the response positions."""
    length = max(len(p) + len(r) for p, r in rollouts)
    input_ids = torch.zeros(len(rollouts), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(rollouts), length, dtype=torch.bool)
    for row, (prompt, response) in enumerate(rollouts):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response)
        attention_mask[row, :end] = 1
        response_mask[row, len(prompt) : end] = True
    segments = Segments.padded(*input_ids.shape, position_mask=attention_mask, token_mask=response_mask)
    return dict(input_ids=input_ids, attention_mask=attention_mask), response_mask, segments


def policy_loss(model, inputs, response_mask, advantages):
    """-sum_i A_i sum_{t in response_i} log p(y_t) / n_response_tokens (ratio 1, no clipping)."""
    logits = model(**inputs, use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    mask = response_mask[:, 1:].to(log_probs.dtype)
    return -(advantages[:, None] * log_probs * mask).sum() / mask.sum()


def stash(model, adapter, rollouts, advantages):
    inputs, response_mask, segments = micro_batch(rollouts)
    capture = KnobGradientCapture(adapter, mode="stash")
    with capture:
        capture.set_segments(segments)
        policy_loss(model, inputs, response_mask, advantages).backward()
    return capture.per_example_gradients(), capture.per_token_gradients(), segments


def route(router: GradientRouter, result, name: str = "route2b"):
    """One micro-batch through a one-router GradientRouter: its rows into the total, then the router's gate."""
    router.add_examples(result.grads)
    return router.add(name, result)


def live_rollouts(seed):
    """4 rollouts answering with the planted pattern, then 4 with random completions; fresh prompts."""
    generator = torch.Generator().manual_seed(seed)
    planted = [(random_ids(generator, 5), MARKER) for _ in range(4)]
    ordinary = [(random_ids(generator, 5), random_ids(generator, 6)) for _ in range(4)]
    return planted + ordinary


def autograd_completion_gradients(model, adapter, prompt: list[int], completion: list[int]) -> dict:
    """{module: (r,)} d log p(completion | prompt) / d keep-knob, by one plain autograd call on this sequence alone."""
    ids = torch.tensor([prompt + completion])
    log_probs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1], -1)
    targets = ids[0, 1:]
    log_p = log_probs[len(prompt) - 1 :].gather(-1, targets[len(prompt) - 1 :, None]).sum()
    grads = torch.autograd.grad(log_p, adapter.knob_parameters())
    return {name: grad[:, EFFECTIVE] for name, grad in zip(adapter.layers, grads)}


def test_pair_gradients_equal_per_sample_autograd_of_completion_log_prob(setup):
    model, adapter, pairs, grads = setup["model"], setup["adapter"], setup["pairs"], setup["grads"]
    worst = 0.0
    for index in (0, 7, 23):
        for completion, stashed in ((pairs[index].hack_ids, grads.hack), (pairs[index].clean_ids, grads.clean)):
            reference = autograd_completion_gradients(model, adapter, pairs[index].prompt_ids, completion)
            for name, grad in reference.items():
                worst = max(worst, (stashed[name][index] - grad).abs().max().item())
    assert worst < 1e-13, f"pair gradients should equal per-sequence autograd of log p(completion | prompt) ({worst:.1e})"
    assert all(p.grad is None for p in model.parameters()), "pair gradients should leave no .grad, knobs included"
    adapter.knob_gradient_totals = True  # as the engine sets it under FSDP1
    try:
        few = pair_gradients(model, adapter, pairs[:3], micro_batch_size=2)
    finally:
        adapter.knob_gradient_totals = False
    for name, layer in adapter.layers.items():
        total = few.hack[name].sum(0) + few.clean[name].sum(0)
        assert torch.allclose(layer.knobs.grad[:, EFFECTIVE], total, rtol=0, atol=1e-13), (
            "with knob_gradient_totals, the effective knob's .grad should hold autograd's own total: the stashed "
            "rows' sum"
        )
    for knob in adapter.knob_parameters():
        knob.grad = None


def test_pair_gradients_do_not_depend_on_micro_batching_with_varied_prompt_lengths(setup):
    """Sorting by prompt length, token-budget micro-batches and logits only from the shortest prompt on must give
    every pair its own per-sequence autograd rows, in the caller's order, however the micro-batches fall."""
    model, adapter = setup["model"], setup["adapter"]
    generator = torch.Generator().manual_seed(11)
    lengths = [9, 2, 6, 1, 12, 4, 7, 3]
    pairs = [Pair(random_ids(generator, n), random_ids(generator, 1 + n % 3), random_ids(generator, 2 + n % 4), "m")
             for n in lengths]
    for micro_batch_size, max_tokens in ((1, None), (16, None), (3, None), (16, 30)):
        batched = pair_gradients(model, adapter, pairs, micro_batch_size=micro_batch_size, max_tokens=max_tokens)
        for index, pair in enumerate(pairs):
            for which, completion in (("hack", pair.hack_ids), ("clean", pair.clean_ids)):
                reference = autograd_completion_gradients(model, adapter, pair.prompt_ids, completion)
                diff = max((getattr(batched, which)[name][index] - grad).abs().max().item()
                           for name, grad in reference.items())
                assert diff < 1e-12, f"pair {index} {which}, micro-batch {micro_batch_size}/{max_tokens} tokens: {diff:.1e}"


def test_one_direction_is_each_modules_top_singular_vector_weighted_by_its_share(setup):
    grads = setup["grads"]
    direction = extract_direction(grads, k=1)
    diffs = {m: grads.hack[m] - grads.clean[m] for m in grads.hack}
    norms = torch.stack([d.pow(2).sum(1) for d in diffs.values()]).sum(0).sqrt()
    for name, rows in direction.items():
        normalised = diffs[name] / norms[:, None]
        _, singular, vh = torch.linalg.svd(normalised, full_matrices=False)
        assert rows.shape == (1, normalised.shape[1])
        assert torch.allclose(rows.norm(dim=1), singular[:1] / N_PAIRS**0.5, atol=1e-12), "row norm = sigma / sqrt(n)"
        assert torch.allclose((rows[0] @ vh[0]).abs(), rows[0].norm(), atol=1e-12), f"{name}: its own top vector"
        projections = normalised @ rows.T
        assert (projections > 0).sum() >= (projections < 0).sum(), f"{name}: the row should point hack-ward"


def test_several_directions_are_joint_singular_vectors_across_modules(setup):
    """k = 2: direction j is one vector over all modules side by side (the joint SVD's j-th right singular vector),
    so its parts in different modules belong together; the rows are orthogonal jointly, not per module."""
    grads = setup["grads"]
    direction = extract_direction(grads, k=2)
    diffs = ModuleRows.of({m: grads.hack[m] - grads.clean[m] for m in grads.hack}).rows
    normalised = diffs / diffs.norm(dim=1, keepdim=True)
    _, singular, vh = torch.linalg.svd(normalised, full_matrices=False)
    joint = ModuleRows.of(direction).rows  # (2, sum r)
    for j in range(2):
        assert torch.allclose(joint[j].norm(), singular[j] / N_PAIRS**0.5, atol=1e-12), "norm = sigma_j / sqrt(n)"
        assert torch.allclose((joint[j] @ vh[j]).abs(), joint[j].norm(), atol=1e-12), f"row {j}: joint vector {j}"
        projections = normalised @ joint[j]
        assert (projections > 0).sum() >= (projections < 0).sum(), f"row {j} should point hack-ward"
    assert abs((joint[0] @ joint[1]).item()) < 1e-12, "the directions should be orthogonal over all modules"
    per_module_dots = [abs((rows[0] @ rows[1]).item()) for rows in direction.values()]
    assert max(per_module_dots) > 1e-6, "joint directions need not be orthogonal within a module (else per-module SVD)"


def test_planted_hack_pattern_gives_a_positive_band_and_routes_the_planted_rollouts(setup):
    model, adapter, direction = setup["model"], setup["adapter"], setup["direction"]
    band = calibrate_band(setup["grads"], setup["folds"]).band
    assert band.width > 0.3, f"a planted hack pattern should give a clearly positive band (got {band})"
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    per_example, _, _ = stash(model, adapter, live_rollouts(seed=11), advantages)
    result = gate(per_example, direction, band)
    planted_reinforced, planted_suppressed, ordinary = result.weights[:3], result.weights[3], result.weights[4:]
    print(f"band {band}; scores {result.scores.numpy().round(3)}; weights {result.weights.numpy().round(3)}")
    assert planted_reinforced.min() > ordinary.max(), "reinforced planted rollouts should be routed more than ordinary ones"
    assert planted_reinforced.mean() > 0.5, "reinforced planted rollouts should be mostly routed"
    assert planted_suppressed == 0.0, "a planted rollout with negative advantage moves away from the hack: not routed"


def test_haar_direction_matches_shape_and_norms_is_seeded_and_gives_no_band(setup, caplog):
    grads, folds, like = setup["grads"], setup["folds"], extract_direction(setup["grads"], k=2)
    random_direction = haar_direction(like, seed=5)
    for name, rows in random_direction.items():
        assert rows.shape == like[name].shape and rows.dtype == like[name].dtype
        assert torch.allclose(rows.norm(dim=1), like[name].norm(dim=1), atol=1e-12), "same row norms as the real one"
        unit = rows / rows.norm(dim=1, keepdim=True)
        assert torch.allclose(unit @ unit.T, torch.eye(2, dtype=rows.dtype), atol=1e-12), "rows should be orthonormal"
    assert all(torch.equal(random_direction[m], haar_direction(like, seed=5)[m]) for m in like), "same seed, same V"
    assert not torch.equal(random_direction[next(iter(like))], haar_direction(like, seed=6)[next(iter(like))])
    reordered = haar_direction(dict(reversed(list(like.items()))), seed=5)
    assert all(torch.equal(random_direction[m], reordered[m]) for m in like), "module order should not change V"

    real_width = calibrate_band(grads, folds).band.width
    with caplog.at_level(logging.WARNING, logger="verl_gq.routing.band"):
        widths = torch.tensor(
            [
                calibrate_band(grads, folds, make_direction=lambda g, s=seed: haar_direction(extract_direction(g), s)).band.width
                for seed in range(HAAR_SEEDS)
            ]
        )
    print(f"real width {real_width:.3f}; Haar widths over {HAAR_SEEDS} seeds: mean {widths.mean():.3f} max {widths.max():.3f}")
    # Measured on this setup (200 seeds): real width 0.60; Haar widths mean -0.20, max +0.024, 2% of seeds > 0.
    # A random direction scores hack and clean alike, so lower (90% of clean) sits above upper (10% of hack):
    # the band is typically negative (degenerate), and in rare seeds barely positive.
    assert widths.mean() < 0, "on average a random direction should give a degenerate (negative-width) band"
    assert widths.max() < 0.15 * real_width, "no random direction should come near the real band width"
    assert "degenerate band" in caplog.text, "degenerate bands should be logged"


def test_frout_matched_band_routes_the_target_fraction_of_gradient_mass(setup):
    model, adapter = setup["model"], setup["adapter"]
    random_direction = haar_direction(setup["direction"], seed=1)
    advantages = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 1.0, -2.0, 1.5], dtype=torch.float64)
    per_example, _, _ = stash(model, adapter, live_rollouts(seed=12), advantages)
    scores = direction_scores({m: -g for m, g in per_example.items()}, random_direction)
    masses = torch.stack([g.pow(2).sum(1) for g in per_example.values()]).sum(0).sqrt()
    band = frout_matched_band(scores, masses, target=0.3, width=0.2)
    # the gate places a live band from the rows it scores: the same band as from the scores and masses above
    result = gate(per_example, random_direction, lambda s, m: frout_matched_band(s, m, target=0.3, width=0.2))
    assert abs(result.band.lower - band.lower) < 1e-12 and abs(result.band.upper - band.upper) < 1e-12
    router = GradientRouter(adapter.module_names, ["random_v"])
    fraction = route(router, result, "random_v")
    frout = router.finish().metrics.routers["random_v"].frout
    assert abs(frout - 0.3) < 1e-9, f"frout_match should route exactly the target mass fraction (got {frout})"
    assert abs(fraction.item() - 0.3) < 1e-9, "add returns the micro-batch's routed fraction"


def test_routers_on_one_stash_match_each_other_and_constant_w_routes_every_unit_alike(setup):
    """Three routers over the same two micro-batches: route2b (calibrated band), random_v placed on each micro-batch
    to route route2b's fraction of that micro-batch, and constant_w routing every unit at route2b's fraction of the
    step. random_v's step frout equals route2b's exactly; constant_w's quarantine is that fraction of the total."""
    model, adapter, direction = setup["model"], setup["adapter"], setup["direction"]
    band = calibrate_band(setup["grads"], setup["folds"]).band
    random_direction = haar_direction(direction, seed=1)
    router = GradientRouter(adapter.module_names, ["route2b", "random_v", "constant_w"], constant={"constant_w": "route2b"})
    for seed, advantages in ((51, [1.0, 0.5, 2.0, -1.0, 1.0, -0.5, 0.3, 1.2]), (52, [0.7, 1.0, -1.2, 0.4, 1.0, 0.2, -0.3, 0.9])):
        per_example, _, _ = stash(model, adapter, live_rollouts(seed), torch.tensor(advantages, dtype=torch.float64))
        rows = ModuleRows.of(per_example)
        router.add_examples(rows)
        fraction = router.add("route2b", gate(rows, direction, band))
        router.add("random_v", gate(rows, random_direction,
                                    lambda s, m: frout_matched_band(s, m, fraction, s.std().clamp_min(1e-6))))
    routed = router.finish()
    frouts = {name: m.frout for name, m in routed.metrics.routers.items()}
    assert 0.05 < frouts["route2b"] < 0.95, frouts
    assert frouts["random_v"] == pytest.approx(frouts["route2b"], abs=1e-9), "matched micro-batch by micro-batch"
    assert frouts["constant_w"] == pytest.approx(frouts["route2b"], abs=1e-12)
    for name in adapter.module_names:
        total = routed.total[name]
        assert torch.allclose(routed.quarantine("constant_w")[name], frouts["route2b"] * total, rtol=0, atol=1e-15)
        for router_name in ("route2b", "random_v", "constant_w"):
            kept, quarantine = routed.kept(router_name)[name], routed.quarantine(router_name)[name]
            assert torch.equal(kept + quarantine, total) or torch.allclose(kept + quarantine, total, rtol=0,
                                                                           atol=1e-16)
    assert not torch.allclose(routed.quarantine("random_v")[name], routed.quarantine("route2b")[name]), \
        "same mass, another direction: a different quarantine"


@pytest.mark.parametrize("granularity", ["rollout", "token"])
def test_kept_plus_quarantine_equals_vanilla_gradient(setup, granularity):
    model, adapter, direction = setup["model"], setup["adapter"], setup["direction"]
    band = calibrate_band(setup["grads"], setup["folds"]).band
    micro_batches = [
        (live_rollouts(seed=21), torch.tensor([1.0, 0.5, -1.0, 2.0, -0.5, 1.0, -2.0, 0.3], dtype=torch.float64)),
        (live_rollouts(seed=22)[2:7], torch.tensor([0.7, -1.2, 1.0, 0.1, -0.4], dtype=torch.float64)),
    ]
    for p in adapter.knob_parameters():
        p.grad = None
    with KnobGradientCapture(adapter, mode="plain"):
        for rollouts, advantages in micro_batches:
            inputs, response_mask, _ = micro_batch(rollouts)
            policy_loss(model, inputs, response_mask, advantages).backward()
    vanilla = {name: layer.knobs.grad[:, EFFECTIVE].clone() for name, layer in adapter.layers.items()}
    for p in adapter.knob_parameters():
        p.grad = None

    router = GradientRouter(adapter.module_names, adapter.quarantine_names)
    (name,) = adapter.quarantine_names
    for rollouts, advantages in micro_batches:
        per_example, per_token, segments = stash(model, adapter, rollouts, advantages)
        rollout_gate = gate(per_example, direction, band)
        router.add_examples(rollout_gate.grads)
        if granularity == "rollout":
            router.add(name, rollout_gate)
        else:
            router.add_tokens(name, rollout_gate, gate(per_token, direction, band), segments.example_of_token)
    # A fake 2-rank reduction (the same sums twice) with grad_scale 1/2 must give the single-rank result.
    routed = router.finish(reduce=lambda flat: flat * 2, grad_scale=0.5)
    write_knob_grads(adapter.knob_parameters(), [routed.knob_grads[m] for m in adapter.module_names])
    worst = max((routed.total[m] - vanilla[m]).abs().max().item() for m in vanilla)
    worst_split = max((routed.kept(name)[m] + routed.quarantine(name)[m] - vanilla[m]).abs().max().item() for m in vanilla)
    metrics = routed.metrics.routers[name]
    print(f"{granularity}: max |total - vanilla| = {worst:.1e}, |kept + quarantine - vanilla| = {worst_split:.1e}; "
          f"metrics {metrics}")
    assert worst < 1e-12 and worst_split < 1e-12, f"kept + quarantine should equal the vanilla gradient ({worst:.1e})"
    assert 0.0 < metrics.frout < 1.0, "the planted rollouts should route part, not all, of the mass"
    assert routed.metrics.n_examples == 2 * 13
    for module, layer in adapter.layers.items():
        expected = torch.stack([routed.total[module], routed.quarantine(name)[module]], dim=1)
        assert torch.equal(layer.knobs.grad, expected), "the knob's gradient: [total | quarantine share]"
        layer.knobs.grad = None


def test_degenerate_band_routes_nothing_and_is_reported(setup):
    model, adapter, direction = setup["model"], setup["adapter"], setup["direction"]
    per_example, _, _ = stash(model, adapter, live_rollouts(seed=31), torch.ones(8, dtype=torch.float64))
    band = Band(lower=0.5, upper=0.2)
    result = gate(per_example, direction, band)
    assert band.degenerate and torch.equal(result.weights, torch.zeros(8, dtype=torch.float64))
    assert Band(float("nan"), 0.3).degenerate, "a NaN bound is degenerate, never NaN weights"
    tensor_band = Band(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    assert torch.equal(tensor_band.weights(result.scores), torch.zeros(8, dtype=torch.float64)), "live bands too"
    router = GradientRouter(adapter.module_names, ["route2b"])
    route(router, result)
    metrics = router.finish().metrics.routers["route2b"]
    assert metrics.band_degenerate_fraction == 1.0 and metrics.frout == 0.0
    assert metrics.quarantine_grad_norm == 0.0 and metrics.kept_grad_norm > 0.0


def test_routing_reads_only_gradients_direction_and_band_never_labels(setup):
    """The no-cheat invariant. The gate and router take no label-like parameter, refuse extra keys in the gradient
    dict, and a micro-batch whose reward, hack and oracle fields are permuted routes identically."""
    model, adapter, direction = setup["model"], setup["adapter"], setup["direction"]
    band = calibrate_band(setup["grads"], setup["folds"]).band
    assert list(inspect.signature(gate).parameters) == ["policy_loss_grads", "direction", "band"]
    assert list(inspect.signature(GradientRouter.add_examples).parameters) == ["self", "examples", "tokens"]
    assert list(inspect.signature(GradientRouter.add).parameters) == ["self", "router", "rollout_gate"]
    assert list(inspect.signature(GradientRouter.add_tokens).parameters) == [
        "self", "router", "rollout_gate", "token_gate", "example_of_token"
    ]
    assert list(inspect.signature(GradientRouter.finish).parameters) == ["self", "reduce", "grad_scale"]

    rollouts = live_rollouts(seed=41)
    batch = {
        "advantages": torch.tensor([1.0, -0.5, 2.0, 1.0, -1.0, 0.5, 1.0, -2.0], dtype=torch.float64),
        "reward": torch.tensor([3.5, 0.5, 3.5, 3.5, 0.0, 0.5, 3.5, 0.0]),
        "exploited": torch.tensor([1, 0, 1, 1, 0, 0, 0, 0]),
        "gt_pass": torch.tensor([0, 0, 0, 0, 0, 1, 1, 0]),
        "mode": ["run_tests", "sentinel", "run_tests", "file_marker", "stdout_marker", "sentinel", "run_tests", "sentinel"],
    }

    def routed_batch(batch):
        per_example, _, _ = stash(model, adapter, rollouts, batch["advantages"])
        result = gate(per_example, direction, band)
        router = GradientRouter(adapter.module_names, ["route2b"])
        route(router, result)
        return result.weights, router.finish()

    weights, routed = routed_batch(batch)
    permutation = torch.tensor([7, 3, 0, 5, 1, 6, 2, 4])
    shuffled = dict(batch, **{k: batch[k][permutation] for k in ("reward", "exploited", "gt_pass")})
    shuffled["mode"] = [batch["mode"][i] for i in permutation.tolist()]
    weights_after, routed_after = routed_batch(shuffled)
    assert torch.equal(weights, weights_after), "gate weights should not change when labels are permuted"
    assert all(torch.equal(routed.knob_grads[m], routed_after.knob_grads[m]) for m in routed.knob_grads)

    per_example, _, _ = stash(model, adapter, rollouts, batch["advantages"])
    with pytest.raises(ValueError, match="exactly the direction's modules"):
        gate({**per_example, "exploited": batch["exploited"][:, None].double()}, direction, band)


def test_k2_score_is_the_larger_of_the_two_direction_cosines(setup):
    grads = setup["grads"]
    direction = extract_direction(grads, k=2)
    first = {m: rows[:1] for m, rows in direction.items()}
    second = {m: rows[1:] for m, rows in direction.items()}
    expected = torch.maximum(direction_scores(grads.hack, first), direction_scores(grads.hack, second))
    assert torch.allclose(direction_scores(grads.hack, direction), expected, atol=1e-14)


def test_direction_and_band_save_with_the_adapter_file(setup, tmp_path):
    adapter, direction = setup["adapter"], setup["direction"]
    band = calibrate_band(setup["grads"], setup["folds"]).band
    adapter.save(tmp_path / "train.safetensors", extra_tensors={**direction_state(direction), **band.state()})
    loaded = adapter.load(tmp_path / "train.safetensors")
    restored = direction_from_state(loaded.extra_tensors, adapter.module_names)
    assert list(restored) == list(direction) and all(torch.equal(restored[m], direction[m]) for m in direction)
    assert Band.from_state(loaded.extra_tensors) == band


def test_bad_routing_inputs_fail_clearly(setup):
    grads, direction, adapter = setup["grads"], setup["direction"], setup["adapter"]
    band = Band(0.1, 0.5)
    name = next(iter(direction))
    nan = {m: g.clone() for m, g in grads.hack.items()}
    nan[name][0, 0] = float("nan")
    nan_gate = gate(nan, direction, band)  # flagged on the device, no host sync
    assert not bool(nan_gate.finite) and bool(gate(grads.hack, direction, band).finite)
    router = GradientRouter(adapter.module_names, ["route2b"])
    route(router, gate(grads.hack, direction, band))
    route(router, nan_gate)
    with pytest.raises(ValueError, match=r"NaN/inf \(1 micro-batches over all ranks"):
        router.finish()
    route(router, gate(grads.hack, direction, band))
    assert router.finish().metrics.n_examples == grads.n_pairs, "a refused step leaves nothing behind"
    with pytest.raises(ValueError, match="should be \\(n, "):
        gate({m: g[:, :-1] for m, g in grads.hack.items()}, direction, band)
    with pytest.raises(ValueError, match="rows, other modules have"):
        gate({m: (g if m != name else g[:3]) for m, g in grads.hack.items()}, direction, band)
    with pytest.raises(ValueError, match="identical hack and clean"):
        extract_direction(type(grads)(grads.clean, grads.clean))
    with pytest.raises(ValueError, match="1 <= k <= min"):
        extract_direction(grads, k=N_PAIRS + 1)
    with pytest.raises(ValueError, match="target"):
        frout_matched_band(torch.zeros(3), torch.ones(3), target=1.5, width=0.1)
    with pytest.raises(ValueError, match="cannot fill"):
        assign_folds(["a", "b"], n_folds=3, seed=0)
    with pytest.raises(ValueError, match="non-empty 1-D sequence of ints"):
        pair_gradients(setup["model"], adapter, [Pair([1, 2], [], [3], "a")])
    router = GradientRouter(list(reversed(adapter.module_names)), ["route2b"])
    with pytest.raises(ValueError, match="exactly the router's modules, in order"):
        router.add("route2b", gate(grads.hack, direction, band))
    router = GradientRouter(adapter.module_names, ["route2b"])
    hack_gate = gate(grads.hack, direction, band)
    with pytest.raises(ValueError, match="example_of_token"):
        router.add_tokens("route2b", hack_gate, hack_gate, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not a gating router"):
        router.add("random_v", hack_gate)
    with pytest.raises(RuntimeError, match="nothing to finish"):
        router.finish()
    router.add_examples(hack_gate.grads)
    with pytest.raises(RuntimeError, match=r"routers \['route2b'\] gated no micro-batch"):
        router.finish()
    with pytest.raises(ValueError, match="must gate"):
        GradientRouter(adapter.module_names, ["a", "b"], constant={"a": "b", "b": "a"})


def test_fit_is_deterministic_refresh_follows_the_weights_and_sharding_gathers_all_pairs(setup):
    model, adapter, pairs = setup["model"], setup["adapter"], setup["pairs"]
    direction, calibration = fit_direction_and_band(model, adapter, pairs, seed=0)
    assert all(torch.equal(direction[m], setup["direction"][m]) for m in direction), "fit = extract on all pairs"
    assert calibration.band == calibrate_band(setup["grads"], setup["folds"]).band
    # Two fake ranks: each computes half the pairs; the "all_gather" concatenates both halves.
    halves = [pair_gradients(model, adapter, pairs[:12]), pair_gradients(model, adapter, pairs[12:])]
    stacked = [torch.stack([torch.cat(list(h.hack.values()), 1), torch.cat(list(h.clean.values()), 1)], 1) for h in halves]
    sharded, _ = fit_direction_and_band(model, adapter, pairs, seed=0, shard=slice(0, 12), gather=lambda local: torch.cat(stacked))
    assert all(torch.allclose(sharded[m], direction[m], atol=1e-12) for m in direction), "sharded fit = single fit"
    haar, haar_calibration = fit_direction_and_band(model, adapter, pairs, seed=0, haar_seed=3)
    assert all(torch.equal(haar[m], haar_direction(direction, 3)[m]) for m in direction), "Haar live direction"
    assert haar_calibration.band.width < calibration.band.width
    layer = next(iter(adapter.layers.values()))
    with torch.no_grad():
        layer.knobs[:, EFFECTIVE].add_(0.5)
    try:
        refreshed, _ = fit_direction_and_band(model, adapter, pairs, seed=0)
    finally:
        with torch.no_grad():
            layer.knobs[:, EFFECTIVE].sub_(0.5)
    assert not torch.allclose(refreshed[next(iter(direction))], direction[next(iter(direction))]), "refresh reads current weights"


@pytest.mark.parametrize("granularity", ["rollout", "token"])
def test_gate_and_router_read_nothing_on_the_host_before_finish_reads_once(granularity):
    """No host sync in the hot path: on the meta device every value read on the host raises, so the gate, the
    router's per-micro-batch adds and finish's device half must run there, and only finish's single read fails."""
    meta = torch.device("meta")
    ranks = {"m0": 3, "m1": 5}
    direction = {name: torch.empty(2, r, dtype=torch.float32, device=meta) for name, r in ranks.items()}
    band = Band(lower=0.1, upper=0.5)
    router = GradientRouter(list(ranks), ["route2b", "random_v", "constant_w"], constant={"constant_w": "route2b"})
    for _ in range(2):  # two micro-batches
        rollouts = ModuleRows.of({name: torch.empty(4, r, device=meta) for name, r in ranks.items()})
        router.add_examples(rollouts)
        rollout_gate = gate(rollouts, direction, band)
        if granularity == "rollout":
            fraction = router.add("route2b", rollout_gate)
        else:
            tokens = {name: torch.empty(9, r, device=meta) for name, r in ranks.items()}
            example_of_token = torch.empty(9, dtype=torch.long, device=meta)
            fraction = router.add_tokens("route2b", rollout_gate, gate(tokens, direction, band), example_of_token)
        live = lambda scores, masses: frout_matched_band(scores, masses, fraction, scores.std())  # noqa: E731
        router.add("random_v", gate(rollouts, direction, live))
    knob_grads, names, scalars = router._reduce_on_device(reduce=lambda flat: flat * 2, grad_scale=0.5)
    assert knob_grads.shape == (4, 8) and knob_grads.device == meta
    assert scalars.shape == (len(names),)
    with pytest.raises((NotImplementedError, RuntimeError)):  # the one host read, which meta cannot serve
        router.finish()
