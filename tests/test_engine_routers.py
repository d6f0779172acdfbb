"""route2b through verl's real FSDP engine (one rank) on a verl-shaped mini-batch and verl's ppo_loss.

One subprocess (tests/gq_engine_harness.py) builds a fresh gq engine per arm from the same tiny base model and runs
one mini-batch's forward/backward as TrainingWorker does; the tests compare the knobs' gradients across arms.
The arm set runs under FSDP2 (gq_fsdp2) and FSDP1 (gq_fsdp, use_orig_params) on the tied-embedding tiny Qwen3, on a
gloo CPU rank or, where there is one, a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).with_name("gq_engine_harness.py")
TOL = 1e-6  # float32 model: routed sums vs one autograd sum differ by rounding only
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


def _arm_options(tmp: Path, strategy: str, checkpoint: bool) -> dict:
    pairs = str(_pair_file(tmp / "pairs.jsonl"))
    route2b = {"method": "route2b", "rank": 8, "pair_file": pairs}
    labels = {"rm_scores": [0.5, 3.5, 0.0, 3.5, 0.5, 0.0, 3.5, 0.5], "hack": [0, 1, 0, 1, 0, 0, 1, 0],
              "solve": [1, 0, 0, 0, 1, 0, 0, 1]}
    permuted = {k: list(reversed(v)) for k, v in labels.items()}
    saved = {"save_checkpoint": str(tmp / "ckpt"), "load_checkpoint": str(tmp / "ckpt")} if checkpoint else {}
    return {
        "n": 8,
        "micro_batch": 4,
        "strategy": strategy,
        "arms": {
            "vanilla": {"gq": {"method": "vanilla", "rank": 8}, "state_dict_after_two_steps": True},
            "route2b": {"gq": route2b, "extra_fields": labels, **saved},
            "route2b_permuted_labels": {"gq": route2b, "extra_fields": permuted},
            "route2b_token": {"gq": {**route2b, "granularity": "token"}},
            "route2b_checkpointing": {"gq": route2b, "checkpointing": True},
            "route2b_planted": {"gq": {**route2b, "pair_file": ""}, "plant_pairs": str(tmp / "planted.jsonl")},
            "vanilla_planted": {"gq": {"method": "vanilla", "rank": 8}, "plant_pairs": str(tmp / "planted.jsonl")},
            "vanilla_padded": {"gq": {"method": "vanilla", "rank": 8}, "remove_padding": False},
            "route2b_padded": {"gq": route2b, "remove_padding": False},  # batch rows: the broadcast stash
            "route2b_token_padded": {"gq": {**route2b, "granularity": "token"}, "remove_padding": False},
            "route2b_two_steps": {"gq": route2b, "state_dict_after_two_steps": True},
            "random_v": {"gq": {**route2b, "direction_source": "haar", "band_mode": "frout_match",
                                "frout_target": RANDOM_V_FROUT}},
            "random_v_token": {"gq": {**route2b, "granularity": "token", "direction_source": "haar",
                                      "band_mode": "frout_match", "frout_target": RANDOM_V_FROUT}},
        },
    }


def _run_arms(model_dir: Path, tmp: Path, strategy: str, pythonpath: str, checkpoint: bool = True) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "result.json"
    _run_harness(model_dir, out, _arm_options(tmp, strategy, checkpoint), pythonpath)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def arms(tiny_model_dir: Path, tmp_path_factory, checkout_pythonpath: str) -> dict:
    """Every arm under FSDP2 on the tied-embedding tiny Qwen3."""
    return _run_arms(tiny_model_dir, tmp_path_factory.mktemp("engine"), "gq_fsdp2", checkout_pythonpath)


# verl's FSDP1 save moves a CPU-resident model "to the GPU" as f"{device}:{id}", i.e. "cpu:cpu" on the CPU platform
# (verl/utils/fsdp_utils.py:229), so FSDP1 checkpoints are exercised on a GPU only.
FSDP1_CPU_CHECKPOINT = "verl's FSDP1 checkpoint path needs an accelerator (device string 'cpu:cpu')"


@pytest.fixture(scope="module")
def fsdp1_and_fsdp2(tiny_model_dir: Path, tmp_path_factory, checkout_pythonpath: str, arms) -> dict:
    """Every arm under FSDP1 (gq_fsdp, use_orig_params) beside the FSDP2 arms, on the same tied-embedding model."""
    fsdp1 = _run_arms(tiny_model_dir, tmp_path_factory.mktemp("engine_fsdp1"), "gq_fsdp", checkout_pythonpath,
                      checkpoint=GPU)
    return {"gq_fsdp": fsdp1, "gq_fsdp2": arms}


def _max_diff(a: dict, b: dict, combine) -> float:
    worst = 0.0
    for module in a:
        x, y = combine(a[module]), combine(b[module])
        worst = max(worst, max(abs(p - q) for p, q in zip(x, y)))
    return worst


def _kept_plus_quarantine(g: dict) -> list[float]:
    """The knobs' total update."""
    return [k + q for k, q in zip(g["keep"], g["quarantine"])]


@pytest.mark.parametrize(
    "arm, baseline",
    [("route2b", "vanilla"), ("route2b_token", "vanilla"), ("route2b_checkpointing", "vanilla"),
     ("route2b_planted", "vanilla_planted"), ("route2b_padded", "vanilla_padded"),
     ("route2b_token_padded", "vanilla_padded"), ("random_v", "vanilla"),
     ("random_v_token", "vanilla")],
)
def test_kept_plus_quarantine_equals_vanilla_gradient_through_the_engine(arms, arm, baseline):
    diff = _max_diff(arms[arm]["grads"], arms[baseline]["grads"], _kept_plus_quarantine)
    scale = max(abs(v) for g in arms[baseline]["grads"].values() for v in g["keep"])
    assert diff <= TOL * scale, f"{arm}: kept + quarantine should equal {baseline}'s gradient (max diff {diff:.3e})"


def test_vanilla_sends_nothing_to_the_quarantine_knob(arms):
    """The knobs of a module are one (2, r) parameter, so vanilla's quarantine row is stepped too: with exactly zero
    gradients AdamW (weight decay included) must leave it at exactly 0 while the kept row trains."""
    for name, g in arms["vanilla"]["grads"].items():
        assert all(v == 0 for v in g["quarantine"]), f"{name}: the vanilla arm should send the quarantine knob nothing"
        assert any(v != 0 for v in g["keep"]), f"{name}: the kept knob should receive the whole gradient"
    for name, knobs in arms["vanilla"]["knobs_after_steps"].items():
        assert all(v == 0 for v in knobs["quarantine"]), f"{name}: vanilla's steps should leave the quarantine at 0"
        assert any(v != 0 for v in knobs["keep"]), f"{name}: vanilla's steps should move the kept knob"


def test_planted_direction_routes_gradient_mass_into_the_quarantine(arms):
    metrics = arms["route2b_planted"]["metrics"]
    assert metrics["gq/band_upper"] > metrics["gq/band_lower"], f"planted pairs should give a positive band: {metrics}"
    assert metrics["gq/frout"] > 0.3, f"the planted rollouts' updates should be routed (frout {metrics['gq/frout']})"
    assert metrics["gq/quarantine_grad_norm"] > 0
    for name, g in arms["vanilla_planted"]["grads"].items():
        assert all(v == 0 for v in g["quarantine"]), f"{name}: on the same batch, vanilla should route nothing"


@pytest.mark.parametrize("arm, tolerance", [("random_v", 1e-6), ("random_v_token", 0.02)])
def test_random_v_routes_its_frout_target_through_the_engine(arms, arm, tolerance):
    """The control: a Haar direction whose live band routes frout_target of each micro-batch's mass; exactly per
    rollout. Per token the token band is matched on the tokens, but each rollout's remainder (its prompt positions)
    carries the rollout band, matched on whole-rollout masses, so the total is near the target, not on it."""
    metrics = arms[arm]["metrics"]
    assert metrics["gq/frout"] == pytest.approx(RANDOM_V_FROUT, abs=tolerance), metrics
    assert metrics["gq/quarantine_grad_norm"] > 0 and metrics["gq/band_width"] > 0


def test_route2b_keeps_knob_gradients_allocated_between_steps(arms):
    """Under route2b the engine zeroes the knob gradients in place (its optimizer_zero_grad), so every step's routed
    write copies into the same gradient tensors in one batched kernel instead of building a DTensor per knob."""
    assert arms["route2b_two_steps"]["knob_grads_kept_allocated"] is True


def test_routing_metrics_are_reported(arms):
    metrics = arms["route2b"]["metrics"]
    for key in ("gq/frout", "gq/cos_mean", "gq/cos_p10", "gq/cos_p90", "gq/band_lower", "gq/band_upper",
                "gq/keep_grad_norm", "gq/quarantine_grad_norm", "gq/refresh"):
        assert key in metrics, f"route2b should report {key}; got {sorted(metrics)}"
    assert 0.0 <= metrics["gq/frout"] <= 1.0


def _assert_same_routing(a: dict, b: dict, what: str) -> None:
    """Two runs of one arm route alike: every knob gradient within TOL of scale (GPU kernels need not be bitwise
    deterministic between two engines) and every routing metric but the refresh's wall time."""
    for combine in (lambda g: g["keep"], lambda g: g["quarantine"]):
        scale = max(max(abs(v) for v in combine(g)) for g in a["grads"].values()) or 1.0
        diff = _max_diff(a["grads"], b["grads"], combine)
        assert diff <= TOL * scale, f"{what}: knob gradients differ by {diff:.3e} (scale {scale:.3e})"
    metrics_a = {k: v for k, v in a["metrics"].items() if k != "gq/refresh_seconds"}
    metrics_b = {k: v for k, v in b["metrics"].items() if k != "gq/refresh_seconds"}
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


def test_resumed_engine_restores_knobs_direction_band_and_step(arms):
    saved, restored = arms["route2b"]["state"], arms["route2b"]["restored_state"]
    assert restored["direction"] == saved["direction"], "the direction should survive a checkpoint round trip"
    assert restored["band"] == saved["band"], "the band should survive a checkpoint round trip"
    assert restored["optimizer_steps"] == saved["optimizer_steps"] == 1
    assert any(v != 0 for k in saved["knobs"].values() for v in k["keep"] + k["quarantine"]), "a step should move knobs"
    assert restored["knobs"] == saved["knobs"], "knob values should survive verl's FSDP checkpoint"


@pytest.mark.parametrize("arm", ["vanilla", "route2b", "route2b_token", "route2b_checkpointing", "route2b_planted",
                                 "vanilla_planted", "vanilla_padded", "route2b_padded", "route2b_token_padded",
                                 "random_v"])
def test_fsdp1_routes_as_fsdp2_does(fsdp1_and_fsdp2, arm):
    """gq_fsdp (FSDP1, use_orig_params) gives every arm the knob gradients and routing metrics of gq_fsdp2."""
    fsdp1, fsdp2 = fsdp1_and_fsdp2["gq_fsdp"][arm], fsdp1_and_fsdp2["gq_fsdp2"][arm]
    _assert_same_routing(fsdp1, fsdp2, f"{arm}: FSDP1 against FSDP2")
    if arm.startswith("vanilla"):
        assert all(v == 0 for g in fsdp1["grads"].values() for v in g["quarantine"]), "vanilla: no quarantine gradient"


def test_fsdp1_comparison_covers_routed_mass(fsdp1_and_fsdp2):
    """The FSDP1/FSDP2 comparison is not vacuous: the planted arm sends gradient to the quarantine knob."""
    metrics = fsdp1_and_fsdp2["gq_fsdp"]["route2b_planted"]["metrics"]
    assert metrics["gq/frout"] > 0.3 and metrics["gq/quarantine_grad_norm"] > 0, metrics


def test_fsdp1_resumed_engine_restores_knobs_direction_band_and_step(fsdp1_and_fsdp2):
    if not GPU:
        pytest.skip(FSDP1_CPU_CHECKPOINT)
    route2b = fsdp1_and_fsdp2["gq_fsdp"]["route2b"]
    assert route2b["restored_state"] == route2b["state"], "FSDP1: knobs, direction, band and step survive a resume"
    assert any(v != 0 for k in route2b["state"]["knobs"].values() for v in k["keep"] + k["quarantine"])


def test_fsdp1_state_dict_holds_every_parameter_after_training(fsdp1_and_fsdp2):
    """After steps, FSDP1's state dict (what verl's checkpoint saves) has every parameter FSDP2's has: torch's
    NO_SHARD catch-all reshard would leave the frozen root unit (embeddings, norm, LM head) out of it."""
    fsdp1 = fsdp1_and_fsdp2["gq_fsdp"]["route2b_two_steps"]["state_dict_keys"]
    assert "model.embed_tokens.weight" in fsdp1 and "model.norm.weight" in fsdp1, fsdp1[:5]
    assert fsdp1 == fsdp1_and_fsdp2["gq_fsdp2"]["route2b_two_steps"]["state_dict_keys"]
