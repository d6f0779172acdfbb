"""The gq engine on two data-parallel ranks equals one rank: route2b under FSDP2 sharding (gloo, CPU).

The same global mini-batch (8 rollouts, micro-batches of 2) goes through one rank and through two (tests/
gq_engine_ranks.py: FSDP2 shards the knobs over two processes; rank k takes rows [4k, 4k+4) as verl's DP dispatch
chunks a mini-batch, with global_batch_size = 8 on both). Each rank gates its own rollouts locally and the engine
all-reduces the routed kept and quarantine gradients (scaled by 1/dp, as FSDP averages, which verl's loss
pre-multiplies by dp_size: token-mean over the all-reduced token count). The pair file is planted on the batch
(tests/gq_engine_harness.py:plant_pairs), so the quarantine gradient is far from zero.

Compared, 1 rank vs 2 ranks: the kept and quarantine gradients, the knob values after the optimizer step, the
reduced gq/ metrics (frout, gradient norms, band), and route2b's state (every direction tensor, the band, the step
counter); the two ranks of the 2-rank run must agree with each other exactly. The route2b arm runs two steps with
refresh=1, so its second step's direction and band are re-extracted from knobs each rank updated shard by shard.

Note: AdamW's first step moves every knob entry by about lr * sign(g), so the knob values check the gradients'
signs and the optimizer path; the gradient comparison is what pins their scale (a missing 1/dp would double them).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("gq_engine_ranks.py")
TOL = 1e-6  # float32 model: two ranks sum the same per-rollout terms in another order, nothing else
# AdamW normalises each knob entry by its own gradient history: after step 2 an entry whose gradient is ~1e-8 (the
# rounding noise of the reduction is ~1e-11 absolute) moves by lr * a ratio carrying ~1e-4 relative noise; seen: 9e-6.
LATER_STEP_KNOB_TOL = 1e-4
STEPS = 2  # the route2b arm: a second step re-extracts the direction (refresh=1) from the stepped knobs
LOCAL_METRICS = ("gq/cos_", "gq/token_cos_", "gq/refresh_seconds")  # score stats are over a rank's own rollouts
BAND_METRICS = ("gq/band_lower", "gq/band_upper", "gq/calibrated_band_lower", "gq/calibrated_band_upper")


def _driver():
    spec = importlib.util.spec_from_file_location("gq_engine_ranks", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory, checkout_pythonpath: str) -> dict:
    tmp = tmp_path_factory.mktemp("ranks")
    planted = str(tmp / "planted.jsonl")
    options = {
        "n": 8,
        "micro_batch": 2,
        "arms": {
            "route2b": {"gq": {"method": "route2b", "rank": 8, "refresh": 1}, "plant_pairs": planted,
                        "steps": STEPS},
            "route2b_token": {"gq": {"method": "route2b", "rank": 8, "granularity": "token"},
                              "plant_pairs": planted},
            "vanilla": {"gq": {"method": "vanilla", "rank": 8}},
        },
    }
    started = time.perf_counter()
    worlds = _driver().launch({1: tmp / "one", 2: tmp / "two"}, tiny_model_dir, options, checkout_pythonpath)
    repo = DRIVER.resolve().parent.parent
    for w in (1, 2):
        for r in worlds[w]:
            source = Path(r.pop("verl_gq_file")).resolve()
            assert source.is_relative_to(repo), f"a rank imported verl_gq from {source}, not from this checkout {repo}"
    cpu = [r.pop("cpu_seconds") for w in (1, 2) for r in worlds[w]]
    print(f"1 rank and 2 ranks (concurrently): {time.perf_counter() - started:.1f} s wall, CPU s per rank {cpu}")
    return {"one": worlds[1][0], "two": worlds[2]}


def _flat(grads: dict, part: str) -> list[float]:
    return [v for g in grads.values() for v in g[part]]


def _rel_diff(ref: list[float], other: list[float]) -> float:
    assert len(ref) == len(other) and ref, "the runs should hold the same, non-empty quantities"
    scale = max(abs(v) for v in ref)
    return max(abs(a - b) for a, b in zip(ref, other)) / scale


ARMS = ["route2b", "route2b_token", "vanilla"]


def test_each_rank_takes_its_half_of_the_global_batch_on_sharded_knobs(runs):
    for arm in ARMS:
        assert runs["one"][arm]["local_rows"] == 8
        assert [r[arm]["local_rows"] for r in runs["two"]] == [4, 4], f"{arm}: each rank should take 4 of 8 rows"
        assert all(r[arm]["global_batch_size"] == 8 for r in runs["two"]), "global_batch_size is the whole batch"
        for r in runs["two"]:
            shard = r[arm]["knob_shard"]
            assert "Shard(dim=0)" in shard["placements"] and shard["local_numel"] * 2 == shard["numel"], (
                f"{arm}: FSDP2 should shard each knob over the two ranks, got {shard}"
            )


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("part", ["keep", "quarantine"])
def test_routed_gradients_equal_one_rank(runs, arm, part):
    for step, ref in enumerate(runs["one"][arm]["steps"]):
        expected = _flat(ref["grads"], part)
        for rank, run in enumerate(runs["two"]):
            got = _flat(run[arm]["steps"][step]["grads"], part)
            if arm == "vanilla" and part == "quarantine":
                assert expected and all(v == 0 for v in expected + got), f"rank {rank}: vanilla's quarantine: zeros"
                continue
            assert max(abs(v) for v in expected) > 0, f"{arm} step {step}: the {part} gradient should be non-zero"
            diff = _rel_diff(expected, got)
            assert diff <= TOL, f"{arm} step {step} rank {rank}: {part} gradient differs from 1 rank by {diff:.2e}"


@pytest.mark.parametrize("arm", ARMS)
def test_knob_values_after_the_step_equal_one_rank(runs, arm):
    def values(step):
        return [v for k in step["knobs"].values() for v in k["keep"] + k["quarantine"]]

    for step, ref in enumerate(runs["one"][arm]["steps"]):
        expected = values(ref)
        assert max(abs(v) for v in expected) > 0, f"{arm}: a step should move the knobs"
        tol = TOL if step == 0 else LATER_STEP_KNOB_TOL
        for rank, run in enumerate(runs["two"]):
            diff = _rel_diff(expected, values(run[arm]["steps"][step]))
            assert diff <= tol, f"{arm} rank {rank}: knob values after step {step + 1} differ from 1 rank by {diff:.2e}"


@pytest.mark.parametrize("arm", ["route2b", "route2b_token"])
def test_reduced_metrics_equal_one_rank(runs, arm):
    for step, ref in enumerate(runs["one"][arm]["steps"]):
        metrics = {k: v for k, v in ref["metrics"].items() if not k.startswith(LOCAL_METRICS)}
        for key in ("gq/frout", "gq/keep_grad_norm", "gq/quarantine_grad_norm", "gq/n_examples", *BAND_METRICS):
            assert key in metrics, f"{arm}: {key} should be reported"
        assert metrics["gq/frout"] > 0.1 and metrics["gq/quarantine_grad_norm"] > 0, (
            f"{arm} step {step}: the planted pairs should route gradient mass: {metrics}"
        )
        for rank, run in enumerate(runs["two"]):
            got = run[arm]["steps"][step]["metrics"]
            for key, value in metrics.items():
                assert abs(got[key] - value) <= TOL * max(1.0, abs(value)), (
                    f"{arm} step {step} rank {rank}: {key} = {got[key]!r}, 1 rank: {value!r}"
                )


@pytest.mark.parametrize("arm", ["route2b", "route2b_token"])
def test_every_rank_holds_the_same_direction_and_band_as_one_rank(runs, arm):
    ref = runs["one"][arm]["route2b_state"]
    assert any(k.startswith("direction.") for k in ref) and "band" in ref, f"state should hold them: {sorted(ref)}"
    rank0, rank1 = (run[arm]["route2b_state"] for run in runs["two"])
    assert rank0 == rank1, f"{arm}: the two ranks should hold bit-identical direction, band and step counter"
    assert sorted(rank0) == sorted(ref)
    assert rank0["optimizer_steps"] == ref["optimizer_steps"] == [float(len(runs["one"][arm]["steps"]))]
    for key, tensor in ref.items():
        diff = max(abs(a - b) for a, b in zip(tensor, rank0[key]))
        assert diff <= TOL, f"{arm}: {key} differs from 1 rank by {diff:.2e}"
    # the refreshed direction (step 2) ran on every rank from all pairs with knobs each rank updated shard-wise
    for step in range(len(runs["one"][arm]["steps"])):
        assert runs["two"][0][arm]["steps"][step]["metrics"]["gq/refresh"] == 1.0
