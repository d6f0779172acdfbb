"""route2b through verl's real FSDP2 engine (gloo, one rank, CPU) on a verl-shaped mini-batch and verl's ppo_loss.

One subprocess (tests/gq_engine_harness.py) builds a fresh gq engine per arm from the same tiny base model and runs
one mini-batch's forward/backward as TrainingWorker does; the tests compare the knobs' gradients across arms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("gq_engine_harness.py")
TOL = 1e-6  # float32 model: routed sums vs one autograd sum differ by rounding only


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


@pytest.fixture(scope="module")
def arms(tiny_model_dir: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("engine")
    pairs = str(_pair_file(tmp / "pairs.jsonl"))
    route2b = {"method": "route2b", "rank": 8, "pair_file": pairs}
    labels = {"rm_scores": [0.5, 3.5, 0.0, 3.5, 0.5, 0.0, 3.5, 0.5], "hack": [0, 1, 0, 1, 0, 0, 1, 0],
              "solve": [1, 0, 0, 0, 1, 0, 0, 1]}
    permuted = {k: list(reversed(v)) for k, v in labels.items()}
    options = {
        "n": 8,
        "micro_batch": 4,
        "arms": {
            "vanilla": {"gq": {"method": "vanilla", "rank": 8}},
            "route2b": {"gq": route2b, "extra_fields": labels, "save_checkpoint": str(tmp / "ckpt"),
                        "load_checkpoint": str(tmp / "ckpt")},
            "route2b_permuted_labels": {"gq": route2b, "extra_fields": permuted},
            "route2b_token": {"gq": {**route2b, "granularity": "token"}},
            "route2b_checkpointing": {"gq": route2b, "checkpointing": True},
            "route2b_planted": {"gq": {**route2b, "pair_file": ""}, "plant_pairs": str(tmp / "planted.jsonl")},
            "vanilla_planted": {"gq": {"method": "vanilla", "rank": 8}, "plant_pairs": str(tmp / "planted.jsonl")},
            "vanilla_padded": {"gq": {"method": "vanilla", "rank": 8}, "remove_padding": False},
            "route2b_token_padded": {"gq": {**route2b, "granularity": "token"}, "remove_padding": False},
        },
    }
    out = tmp / "result.json"
    # this checkout first: the harness's sys.path starts at tests/, so `import verl_gq` would otherwise find whichever
    # checkout is installed editable in the environment (e.g. another git worktree)
    repo = str(HARNESS.resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, str(HARNESS), str(tiny_model_dir), str(out), json.dumps(options)],
                   check=True, timeout=600, env=env)
    return json.loads(out.read_text())


def _max_diff(a: dict, b: dict, combine) -> float:
    worst = 0.0
    for module in a:
        x, y = combine(a[module]), combine(b[module])
        worst = max(worst, max(abs(p - q) for p, q in zip(x, y)))
    return worst


def _kept_plus_quarantine(g: dict) -> list[float]:
    """The knobs' total update; a knob without gradient (vanilla's quarantine) contributes nothing."""
    return [k + q for k, q in zip(g["keep"], g["quarantine"] or [0.0] * len(g["keep"]))]


@pytest.mark.parametrize(
    "arm, baseline",
    [("route2b", "vanilla"), ("route2b_token", "vanilla"), ("route2b_checkpointing", "vanilla"),
     ("route2b_planted", "vanilla_planted"), ("route2b_token_padded", "vanilla_padded")],
)
def test_kept_plus_quarantine_equals_vanilla_gradient_through_the_engine(arms, arm, baseline):
    diff = _max_diff(arms[arm]["grads"], arms[baseline]["grads"], _kept_plus_quarantine)
    scale = max(abs(v) for g in arms[baseline]["grads"].values() for v in g["keep"])
    assert diff <= TOL * scale, f"{arm}: kept + quarantine should equal {baseline}'s gradient (max diff {diff:.3e})"


def test_vanilla_sends_nothing_to_the_quarantine_knob(arms):
    for name, g in arms["vanilla"]["grads"].items():
        assert g["quarantine"] is None, f"{name}: the vanilla arm should leave the quarantine knob without gradient"
        assert any(v != 0 for v in g["keep"]), f"{name}: the kept knob should receive the whole gradient"


def test_planted_direction_routes_gradient_mass_into_the_quarantine(arms):
    metrics = arms["route2b_planted"]["metrics"]
    assert metrics["gq/band_upper"] > metrics["gq/band_lower"], f"planted pairs should give a positive band: {metrics}"
    assert metrics["gq/frout"] > 0.3, f"the planted rollouts' updates should be routed (frout {metrics['gq/frout']})"
    assert metrics["gq/quarantine_grad_norm"] > 0
    for name, g in arms["vanilla_planted"]["grads"].items():
        assert g["quarantine"] is None, f"{name}: on the same batch, vanilla should route nothing"


def test_routing_metrics_are_reported(arms):
    metrics = arms["route2b"]["metrics"]
    for key in ("gq/frout", "gq/cos_mean", "gq/cos_p10", "gq/cos_p90", "gq/band_lower", "gq/band_upper",
                "gq/keep_grad_norm", "gq/quarantine_grad_norm", "gq/refresh"):
        assert key in metrics, f"route2b should report {key}; got {sorted(metrics)}"
    assert 0.0 <= metrics["gq/frout"] <= 1.0


def test_routing_ignores_reward_labels_and_hack_flags(arms):
    """No-cheat invariant: the batch's rewards, hack and solve flags reach the engine but not the gate."""
    a, b = arms["route2b"], arms["route2b_permuted_labels"]
    assert a["grads"] == b["grads"], "permuting reward/hack/solve fields should not change any routed gradient"
    timing = {"gq/refresh_seconds"}
    same = {k: v for k, v in a["metrics"].items() if k not in timing}
    assert same == {k: v for k, v in b["metrics"].items() if k not in timing}, (
        "permuting reward/hack/solve fields should not change the routing metrics"
    )


def test_resumed_engine_restores_knobs_direction_band_and_step(arms):
    saved, restored = arms["route2b"]["state"], arms["route2b"]["restored_state"]
    assert restored["direction"] == saved["direction"], "the direction should survive a checkpoint round trip"
    assert restored["band"] == saved["band"], "the band should survive a checkpoint round trip"
    assert restored["optimizer_steps"] == saved["optimizer_steps"] == 1
    assert any(v != 0 for k in saved["knobs"].values() for v in k["keep"] + k["quarantine"]), "a step should move knobs"
    assert restored["knobs"] == saved["knobs"], "knob values should survive verl's FSDP checkpoint"
