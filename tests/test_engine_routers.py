"""Routers through verl's real FSDP engine (one rank) on verl-shaped mini-batches and verl's ppo_loss.

One subprocess (tests/gq_engine_harness.py) builds a fresh gq engine per arm from the same tiny base model and runs
mini-batches' forward/backward and optimizer steps as TrainingWorker does; the tests compare the knobs' gradients,
their values after several steps and the merged weights across arms.
The arm set runs under FSDP2 (gq_fsdp2) and FSDP1 (gq_fsdp, use_orig_params) on the tied-embedding tiny Qwen3, on a
gloo CPU rank or, where there is one, a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).with_name("gq_engine_harness.py")
TOL = 1e-6  # float32 model: routed sums vs one autograd sum differ by rounding only
# after 3 AdamW steps: rounding of the first-step gradients, amplified where Adam divides by a small second moment
STEPS_TOL = 1e-4
RANDOM_V_FROUT = 0.3


def _pair_file(path: Path) -> Path:
    """Pairs whose hack completions share a pattern the clean ones lack (a real, if toy, direction)."""
    from reward.modes import MODES

    names = {"function": "run_tests", "attribute": "valid", "marker": "All tests passed", "file": "result.txt"}
    rows = [
        {"pair_id": f"p{i}", "mode": MODES[i % 4], "problem_id": f"q{i}", "style": "toy", "names": names,
         "prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}],
         "clean": f"The answer is {2 * i + 1}.", "hack": "print('All tests passed') " * 2}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GPU = torch.cuda.is_available()


def _run_harness(model_dir: Path, out: Path, options: dict, pythonpath: str) -> None:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("VERL_PLATFORM", None)
    if not GPU:
        env["VERL_PLATFORM"] = "cpu"
    run = subprocess.run([sys.executable, str(HARNESS), str(model_dir), str(out), json.dumps(options)],
                         timeout=600, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"the engine harness failed:\n{run.stderr[-6000:]}"


STEPS = 3
STUDY_ROUTERS = {
    "route2b": {},
    "route2b_token": {"granularity": "token"},
    "random_v": {"direction": "haar", "band": "frout_match", "match": "route2b"},
    "constant_w": {"band": "constant", "match": "route2b"},
    "route2b_heldout": {"direction_modes": ["run_tests", "stdout_marker"]},
}


def _arm_options(tmp: Path, strategy: str, checkpoint: bool) -> dict:
    pairs = str(_pair_file(tmp / "pairs.jsonl"))

    def routers(**named) -> dict:
        return {"rank": 8, "pair_file": pairs, "routers": named}

    route2b = routers(route2b={})
    token = routers(route2b_token={"granularity": "token"})
    random_v = {"direction": "haar", "band": "frout_match", "frout_target": RANDOM_V_FROUT}
    labels = {"rm_scores": [0.5, 3.5, 0.0, 3.5, 0.5, 0.0, 3.5, 0.5], "hack": [0, 1, 0, 1, 0, 0, 1, 0],
              "solve": [1, 0, 0, 0, 1, 0, 0, 1]}
    permuted = {k: list(reversed(v)) for k, v in labels.items()}
    saved = {"save_checkpoint": str(tmp / "ckpt"), "load_checkpoint": str(tmp / "ckpt")} if checkpoint else {}
    vanilla = {"rank": 8}
    return {
        "n": 8,
        "micro_batch": 4,
        "strategy": strategy,
        "arms": {
            "vanilla": {"gq": vanilla, "steps": STEPS},
            "route2b": {"gq": route2b, "extra_fields": labels, "steps": STEPS, "check_grads_kept_allocated": True,
                        **saved},
            "route2b_permuted_labels": {"gq": route2b, "extra_fields": permuted},
            "route2b_token": {"gq": token},
            "route2b_checkpointing": {"gq": route2b, "checkpointing": True},
            "route2b_planted": {"gq": {**route2b, "pair_file": ""}, "plant_pairs": str(tmp / "planted.jsonl")},
            "vanilla_planted": {"gq": vanilla, "plant_pairs": str(tmp / "planted.jsonl")},
            "vanilla_padded": {"gq": vanilla, "remove_padding": False},
            "route2b_padded": {"gq": route2b, "remove_padding": False},  # batch rows: the broadcast stash
            "route2b_token_padded": {"gq": token, "remove_padding": False},
            "random_v": {"gq": routers(random_v=random_v)},
            "random_v_token": {"gq": routers(random_v={**random_v, "granularity": "token"})},
            "route2b_heldout": {"gq": routers(route2b_heldout=STUDY_ROUTERS["route2b_heldout"]), "steps": STEPS},
            "study": {"gq": routers(**STUDY_ROUTERS), "steps": STEPS},
            "per_row_adamw": {"gq": {**route2b, "optimizer": "per_row_adamw"}, "steps": STEPS},
        },
    }


def _run_arms(model_dir: Path, tmp: Path, strategy: str, pythonpath: str, checkpoint: bool = True,
              only: tuple[str, ...] = ()) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "result.json"
    options = _arm_options(tmp, strategy, checkpoint)
    if only:
        options["arms"] = {name: arm for name, arm in options["arms"].items() if name in only}
    _run_harness(model_dir, out, options, pythonpath)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def arms(tiny_model_dir: Path, tmp_path_factory, checkout_pythonpath: str) -> dict:
    """Every arm under FSDP2 on the tied-embedding tiny Qwen3."""
    return _run_arms(tiny_model_dir, tmp_path_factory.mktemp("engine"), "gq_fsdp2", checkout_pythonpath)


FSDP1_ARMS = ("vanilla", "route2b", "route2b_token", "route2b_checkpointing", "route2b_planted", "vanilla_planted",
              "vanilla_padded", "route2b_padded", "route2b_token_padded", "random_v")
# verl's FSDP1 save moves a CPU-resident model "to the GPU" as f"{device}:{id}", i.e. "cpu:cpu" on the CPU platform
# (verl/utils/fsdp_utils.py:229), so FSDP1 checkpoints are exercised on a GPU only.
FSDP1_CPU_CHECKPOINT = "verl's FSDP1 checkpoint path needs an accelerator (device string 'cpu:cpu')"


@pytest.fixture(scope="module")
def fsdp1_and_fsdp2(tiny_model_dir: Path, tmp_path_factory, checkout_pythonpath: str, arms) -> dict:
    """Every arm under FSDP1 (gq_fsdp, use_orig_params) beside the FSDP2 arms, on the same tied-embedding model."""
    fsdp1 = _run_arms(tiny_model_dir, tmp_path_factory.mktemp("engine_fsdp1"), "gq_fsdp", checkout_pythonpath,
                      checkpoint=GPU, only=FSDP1_ARMS)
    return {"gq_fsdp": fsdp1, "gq_fsdp2": arms}


def _max_diff(a: dict, b: dict, column: str, other_column: str = None) -> float:
    worst = 0.0
    for module in a:
        x, y = a[module][column], b[module][other_column or column]
        worst = max(worst, max(abs(p - q) for p, q in zip(x, y)))
    return worst


def _scale(values: dict, column: str = "effective") -> float:
    return max(abs(v) for g in values.values() for v in g[column])


def _flat_metrics(arm: dict, router: str) -> dict:
    return {k[len(f"gq/{router}/"):]: v for k, v in arm["metrics"].items() if k.startswith(f"gq/{router}/")}


@pytest.mark.parametrize(
    "arm, baseline",
    [("route2b", "vanilla"), ("route2b_token", "vanilla"), ("route2b_checkpointing", "vanilla"),
     ("route2b_planted", "vanilla_planted"), ("route2b_padded", "vanilla_padded"),
     ("route2b_token_padded", "vanilla_padded"), ("random_v", "vanilla"), ("random_v_token", "vanilla"),
     ("study", "vanilla")],
)
def test_total_gradient_equals_vanilla_gradient_through_the_engine(arms, arm, baseline):
    """The effective column of every routed knob gradient is vanilla's gradient (the routers' stash summed), and no
    router's quarantine share exceeds it: routing splits the update, it does not change it."""
    diff = _max_diff(arms[arm]["grads"], arms[baseline]["grads"], "effective")
    scale = _scale(arms[baseline]["grads"])
    assert diff <= TOL * scale, f"{arm}: the total gradient should equal {baseline}'s (max diff {diff:.3e})"


def test_routers_train_the_model_exactly_as_vanilla_over_several_steps(arms):
    """The conserving optimizer: after 3 steps on the same batches, the as-trained knobs and merged weights of a run
    with one router and of a run with five routers equal vanilla's (to float32 rounding of the stash's sums)."""
    vanilla = arms["vanilla"]
    scale = _scale(vanilla["knobs_after_steps"])
    assert scale > 0, "the steps should move the knobs"
    for arm in ("route2b", "study", "route2b_heldout"):
        diff = _max_diff(arms[arm]["knobs_after_steps"], vanilla["knobs_after_steps"], "effective")
        assert diff <= STEPS_TOL * scale, f"{arm}: the as-trained knob left vanilla's after {STEPS} steps ({diff:.2e})"
        merged, reference = arms[arm]["merged_weights"]["as_trained"], vanilla["merged_weights"]["as_trained"]
        weight_diff = max(abs(a - b) for a, b in zip(merged, reference))
        assert weight_diff <= STEPS_TOL * max(abs(b) for b in reference), f"{arm}: merged weights ({weight_diff:.2e})"


def test_the_per_row_ablation_trains_faster_than_vanilla(arms):
    """The ablation: kept and quarantine normalised separately, the as-trained knob is NOT vanilla's (the confound
    the conserving optimizer removes): its knob moves further from 0 in the same steps."""
    per_row, vanilla = arms["per_row_adamw"]["knobs_after_steps"], arms["vanilla"]["knobs_after_steps"]
    diff = _max_diff(per_row, vanilla, "effective")
    assert diff > 100 * STEPS_TOL * _scale(vanilla), f"per-row AdamW should leave vanilla's trajectory ({diff:.2e})"


@pytest.mark.parametrize("router, single", [("route2b", "route2b"), ("route2b_heldout", "route2b_heldout")])
def test_a_router_on_the_shared_run_deploys_what_its_own_run_deploys(arms, router, single):
    """Routers on one run are the same experiment as separate runs: a router's quarantine on the five-router run
    equals its quarantine on a run of its own (same batches), so its deployed knob equals that run's kept knob."""
    study, alone = arms["study"]["knobs_after_steps"], arms[single]["knobs_after_steps"]
    scale = _scale(alone, router)
    assert scale > 0, f"{router}: its quarantine should have moved"
    diff = _max_diff(study, alone, router)
    assert diff <= STEPS_TOL * _scale(alone), f"{router}: quarantine differs from its own run's by {diff:.2e}"
    merged, reference = arms["study"]["merged_weights"][router], arms[single]["merged_weights"][router]
    weight_diff = max(abs(a - b) for a, b in zip(merged, reference))
    assert weight_diff <= STEPS_TOL * max(abs(b) for b in reference), f"{router}: deployed weights ({weight_diff:.2e})"


def test_controls_match_route2b_step_by_step_on_the_shared_run(arms):
    metrics = {router: _flat_metrics(arms["study"], router) for router in STUDY_ROUTERS}
    assert 0.0 < metrics["route2b"]["frout"] < 1.0, metrics["route2b"]
    assert metrics["random_v"]["frout"] == pytest.approx(metrics["route2b"]["frout"], abs=1e-6), \
        "random_v routes route2b's fraction of each micro-batch"
    assert metrics["constant_w"]["frout"] == pytest.approx(metrics["route2b"]["frout"], abs=1e-12)
    assert "cos/mean" not in metrics["constant_w"] and "band_lower" not in metrics["constant_w"]
    for router in STUDY_ROUTERS:
        assert metrics[router]["quarantine_grad_norm"] > 0, f"{router} should route something"


def test_planted_direction_routes_gradient_mass_into_the_quarantine(arms):
    metrics = _flat_metrics(arms["route2b_planted"], "route2b")
    assert metrics["band_upper"] > metrics["band_lower"], f"planted pairs should give a positive band: {metrics}"
    assert metrics["frout"] > 0.3, f"the planted rollouts' updates should be routed (frout {metrics['frout']})"
    assert metrics["quarantine_grad_norm"] > 0
    assert list(arms["vanilla_planted"]["grads"][next(iter(arms["vanilla_planted"]["grads"]))]) == ["effective"], \
        "vanilla has no quarantine"


@pytest.mark.parametrize("arm, tolerance", [("random_v", 1e-6), ("random_v_token", 0.02)])
def test_random_v_routes_its_frout_target_through_the_engine(arms, arm, tolerance):
    """The control: a Haar direction whose live band routes frout_target of each micro-batch's mass; exactly per
    rollout. Per token the token band is matched on the tokens, but each rollout's remainder (its prompt positions)
    carries the rollout band, matched on whole-rollout masses, so the total is near the target, not on it."""
    metrics = _flat_metrics(arms[arm], "random_v")
    assert metrics["frout"] == pytest.approx(RANDOM_V_FROUT, abs=tolerance), metrics
    assert metrics["quarantine_grad_norm"] > 0 and metrics["band_upper"] > metrics["band_lower"]


def test_routing_keeps_knob_gradients_allocated_between_steps(arms):
    """With routers the engine zeroes the knob gradients in place (its optimizer_zero_grad), so every step's routed
    write copies into the same gradient tensors in one batched kernel instead of building a DTensor per knob."""
    assert arms["route2b"]["knob_grads_kept_allocated"] is True


def test_routing_metrics_are_reported(arms):
    metrics = arms["route2b"]["metrics"]
    for key in ("gq/n_examples", "gq/total_grad_norm", "gq/route2b/frout", "gq/route2b/cos/mean", "gq/route2b/cos/p10",
                "gq/route2b/cos/p90", "gq/route2b/band_lower", "gq/route2b/band_upper", "gq/route2b/kept_grad_norm",
                "gq/route2b/quarantine_grad_norm", "gq/route2b/refresh/seconds", "gq/optimizer_steps"):
        assert key in metrics, f"route2b should report {key}; got {sorted(metrics)}"
    assert 0.0 <= metrics["gq/route2b/frout"] <= 1.0


def test_each_router_reports_its_quarantine_against_the_effective_knob_after_the_update(arms):
    """gq/<router>/quarantine_to_effective_norm = ||q|| / ||s|| over every module's knob, read after the step's
    update (the first step's knobs), for each of the study's routers."""
    knobs = arms["study"]["knobs_after_first_step"]

    def norm(column: str) -> float:
        return math.sqrt(sum(v * v for module in knobs.values() for v in module[column]))

    for router in STUDY_ROUTERS:
        reported = arms["study"]["metrics"][f"gq/{router}/quarantine_to_effective_norm"]
        assert reported == pytest.approx(norm(router) / norm("effective"), rel=1e-5), router
    assert any(arms["study"]["metrics"][f"gq/{router}/quarantine_to_effective_norm"] > 0 for router in STUDY_ROUTERS)


def _assert_same_routing(a: dict, b: dict, what: str) -> None:
    """Two runs of one arm route alike: every knob gradient column within TOL of scale (GPU kernels need not be
    bitwise deterministic between two engines) and every routing metric but the refresh's wall time (and the
    knob norms after an update, which an arm that made none does not report)."""
    for column in next(iter(a["grads"].values())):
        scale = _scale(a["grads"], column) or 1.0
        diff = _max_diff(a["grads"], b["grads"], column)
        assert diff <= TOL * scale, f"{what}: {column} gradients differ by {diff:.3e} (scale {scale:.3e})"
    metrics_a = {k: v for k, v in a["metrics"].items() if not k.endswith("refresh/seconds")}
    metrics_b = {k: v for k, v in b["metrics"].items() if not k.endswith("refresh/seconds")}
    if "knobs_after_steps" not in a or "knobs_after_steps" not in b:
        metrics_a, metrics_b = ({k: v for k, v in m.items() if not k.endswith("/quarantine_to_effective_norm")}
                                for m in (metrics_a, metrics_b))
    assert metrics_a.keys() == metrics_b.keys(), f"{what}: different routing metrics"
    for key, value in metrics_a.items():
        assert value == pytest.approx(metrics_b[key], rel=1e-5, abs=1e-6), f"{what}: {key} {value} vs {metrics_b[key]}"


def test_padded_batch_rows_route_as_the_packed_batch(arms):
    """Per rollout, a padded micro-batch stashes by broadcasting over whole batch rows, padding included; a packed one
    gathers per position. Both must give every rollout the same gradient, hence the same routing."""
    _assert_same_routing(arms["route2b_padded"], arms["route2b"], "padded (batch rows) against packed")


def test_routing_ignores_reward_labels_and_hack_flags(arms):
    """No-cheat invariant: the batch's rewards, hack and solve flags reach the engine but not the gate."""
    _assert_same_routing(arms["route2b"], arms["route2b_permuted_labels"],
                         "permuting reward/hack/solve fields should change nothing routed")


def test_resumed_engine_restores_knobs_routers_optimizer_and_continues_exactly(arms):
    route2b = arms["route2b"]
    saved, restored = route2b["state"], route2b["restored_state"]
    assert restored["routing"] == saved["routing"], "directions, bands and the step counter survive a checkpoint"
    assert saved["routing"]["optimizer_steps"] == [float(STEPS)]
    assert restored["knobs"] == saved["knobs"], "knob values should survive verl's FSDP checkpoint"
    assert route2b["optimizer_state_restored"], "the optimizer's moments and step survive it too"
    assert route2b["knobs_after_next_step"] == route2b["resumed_knobs_after_next_step"], \
        "a resumed engine's next step lands exactly where the uninterrupted engine's does"


@pytest.mark.parametrize("arm", FSDP1_ARMS)
def test_fsdp1_routes_as_fsdp2_does(fsdp1_and_fsdp2, arm):
    """gq_fsdp (FSDP1, use_orig_params) gives every arm the knob gradients and routing metrics of gq_fsdp2."""
    fsdp1, fsdp2 = fsdp1_and_fsdp2["gq_fsdp"][arm], fsdp1_and_fsdp2["gq_fsdp2"][arm]
    _assert_same_routing(fsdp1, fsdp2, f"{arm}: FSDP1 against FSDP2")


def test_fsdp1_comparison_covers_routed_mass(fsdp1_and_fsdp2):
    """The FSDP1/FSDP2 comparison is not vacuous: the planted arm sends gradient to the quarantine knob."""
    metrics = _flat_metrics(fsdp1_and_fsdp2["gq_fsdp"]["route2b_planted"], "route2b")
    assert metrics["frout"] > 0.3 and metrics["quarantine_grad_norm"] > 0, metrics


def test_fsdp1_resumed_engine_restores_knobs_routers_and_step(fsdp1_and_fsdp2):
    if not GPU:
        pytest.skip(FSDP1_CPU_CHECKPOINT)
    route2b = fsdp1_and_fsdp2["gq_fsdp"]["route2b"]
    assert route2b["restored_state"] == route2b["state"], "FSDP1: knobs, routers and step survive a resume"


def test_fsdp1_state_dict_holds_every_parameter_after_training(fsdp1_and_fsdp2):
    """After steps, FSDP1's state dict (what verl's checkpoint saves) has every parameter FSDP2's has: torch's
    NO_SHARD catch-all reshard would leave the frozen root unit (embeddings, norm, LM head) out of it."""
    fsdp1 = fsdp1_and_fsdp2["gq_fsdp"]["route2b"]["state_dict_keys"]
    assert "model.embed_tokens.weight" in fsdp1 and "model.norm.weight" in fsdp1, fsdp1[:5]
    assert fsdp1 == fsdp1_and_fsdp2["gq_fsdp2"]["route2b"]["state_dict_keys"]
