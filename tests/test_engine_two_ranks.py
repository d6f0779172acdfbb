"""The gq engine on two data-parallel ranks equals one rank: routers under FSDP2 sharding (gloo, CPU).

The same global mini-batch (8 rollouts, micro-batches of 2) goes through one rank and through two (tests/
gq_engine_ranks.py: FSDP2 shards the knobs over two processes; rank k takes rows [4k, 4k+4) as verl's DP dispatch
chunks a mini-batch, with global_batch_size = 8 on both). Each rank gates its own rollouts locally and the engine
all-reduces the total and quarantine gradients (scaled by 1/dp, as FSDP averages, which verl's loss pre-multiplies
by dp_size: token-mean over the all-reduced token count). The pair file is planted on the batch
(tests/gq_engine_harness.py:plant_pairs), so the quarantine gradient is far from zero.

Compared, 1 rank vs 2 ranks: every knob column's gradient, the knob values after each optimizer step (the conserving
AdamW steps each rank's shard, with a shard's every column on one rank, and clips on the norm all-reduced over the
ranks), the reduced gq/ metrics (frout, gradient norms, band), and the routers' state (every direction tensor, band,
the step counter); the two ranks of the 2-rank run must agree with each other exactly. The route2b arm runs its
steps with refresh=1, so each later step's direction and band are re-extracted from knobs each rank updated shard
by shard. On both worlds, the runs with routers train the as-trained knobs exactly as vanilla does, and a router on
a two-router run deploys what its own run deploys.

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
STEPS = 3  # later steps re-extract the direction (refresh=1) from the stepped knobs
LOCAL_METRICS = ("/cos/", "/token_cos/", "/refresh/seconds")  # score stats are over a rank's own rollouts
BAND_METRICS = ("band_lower", "band_upper", "refresh/band_lower", "refresh/band_upper")


def _driver():
    spec = importlib.util.spec_from_file_location("gq_engine_ranks", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory, checkout_pythonpath: str) -> dict:
    tmp = tmp_path_factory.mktemp("ranks")
    planted = str(tmp / "planted.jsonl")
    routed = {"rank": 8, "routers": {"route2b": {"refresh": 1}}}
    heldout = {"refresh": 1, "direction_modes": ["run_tests", "stdout_marker"]}
    options = {
        "n": 8,
        "micro_batch": 2,
        "arms": {
            "route2b": {"gq": routed, "plant_pairs": planted, "steps": STEPS},
            "route2b_token": {"gq": {"rank": 8, "routers": {"route2b_token": {"granularity": "token"}}},
                              "plant_pairs": planted},
            "vanilla": {"gq": {"rank": 8}, "plant_pairs": planted, "steps": STEPS},  # the same (planted) batch
            "two_routers": {"gq": {"rank": 8, "routers": {"route2b": {"refresh": 1}, "route2b_heldout": heldout}},
                            "plant_pairs": planted, "steps": STEPS},
            "route2b_heldout": {"gq": {"rank": 8, "routers": {"route2b_heldout": heldout}}, "plant_pairs": planted,
                                "steps": STEPS},
        },
    }
    started = time.perf_counter()
    worlds = _driver().launch({1: tmp / "one", 2: tmp / "two"}, tiny_model_dir, options, checkout_pythonpath)
    repo = DRIVER.resolve().parent.parent / "src"
    for w in (1, 2):
        for r in worlds[w]:
            source = Path(r.pop("verl_gq_file")).resolve()
            assert source.is_relative_to(repo), f"a rank imported verl_gq from {source}, not from this checkout {repo}"
    cpu = [r.pop("cpu_seconds") for w in (1, 2) for r in worlds[w]]
    print(f"1 rank and 2 ranks (concurrently): {time.perf_counter() - started:.1f} s wall, CPU s per rank {cpu}")
    return {"one": worlds[1][0], "two": worlds[2]}


def _flat(grads: dict, column: str) -> list[float]:
    return [v for g in grads.values() for v in g[column]]


def _rel_diff(ref: list[float], other: list[float]) -> float:
    assert len(ref) == len(other) and ref, "the runs should hold the same, non-empty quantities"
    scale = max(abs(v) for v in ref)
    return max(abs(a - b) for a, b in zip(ref, other)) / scale


ARMS = ["route2b", "route2b_token", "vanilla", "two_routers", "route2b_heldout"]


def _columns(run: dict, arm: str) -> list[str]:
    return list(next(iter(run[arm]["steps"][0]["grads"].values())))


def test_each_rank_takes_its_half_of_the_global_batch_on_sharded_knobs(runs):
    for arm in ARMS:
        assert runs["one"][arm]["local_rows"] == 8
        assert [r[arm]["local_rows"] for r in runs["two"]] == [4, 4], f"{arm}: each rank should take 4 of 8 rows"
        assert all(r[arm]["global_batch_size"] == 8 for r in runs["two"]), "global_batch_size is the whole batch"
        for r in runs["two"]:
            shard = r[arm]["knob_shard"]
            assert "Shard(dim=0)" in shard["placements"] and shard["local_numel"] * 2 == shard["numel"], (
                f"{arm}: FSDP2 should shard each knob's rank dimension over the two ranks, got {shard}"
            )


@pytest.mark.parametrize("arm", ARMS)
def test_routed_gradients_equal_one_rank(runs, arm):
    for column in _columns(runs["one"], arm):
        first = _flat(runs["one"][arm]["steps"][0]["grads"], column)
        assert max(abs(v) for v in first) > 0, f"{arm} step 1: the {column} gradient should be non-zero"
        for step, ref in enumerate(runs["one"][arm]["steps"]):
            expected = _flat(ref["grads"], column)
            if max(abs(v) for v in expected) == 0:  # a later band may route nothing: then neither world does
                assert all(v == 0 for run in runs["two"] for v in _flat(run[arm]["steps"][step]["grads"], column))
                continue
            for rank, run in enumerate(runs["two"]):
                diff = _rel_diff(expected, _flat(run[arm]["steps"][step]["grads"], column))
                assert diff <= TOL, f"{arm} step {step} rank {rank}: {column} gradient differs from 1 rank by {diff:.2e}"


@pytest.mark.parametrize("arm", ARMS)
def test_knob_values_after_each_step_equal_one_rank(runs, arm):
    def values(step):
        return [v for k in step["knobs"].values() for column in k.values() for v in column]

    for step, ref in enumerate(runs["one"][arm]["steps"]):
        expected = values(ref)
        assert max(abs(v) for v in expected) > 0, f"{arm}: a step should move the knobs"
        tol = TOL if step == 0 else LATER_STEP_KNOB_TOL
        for rank, run in enumerate(runs["two"]):
            diff = _rel_diff(expected, values(run[arm]["steps"][step]))
            assert diff <= tol, f"{arm} rank {rank}: knob values after step {step + 1} differ from 1 rank by {diff:.2e}"


@pytest.mark.parametrize("world", ["one", "two"])
def test_routers_train_as_vanilla_and_deploy_what_their_own_runs_deploy(runs, world):
    """On one rank and on two: after 3 steps the as-trained knob of every run with routers is vanilla's, and each
    router of the two-router run holds the quarantine (so deploys the kept knob) of its own single-router run."""
    run = runs["one"] if world == "one" else runs["two"][0]

    def knobs(arm: str, column: str) -> list[float]:
        return [v for k in run[arm]["steps"][-1]["knobs"].values() for v in k[column]]

    vanilla = knobs("vanilla", "effective")
    for arm in ("route2b", "two_routers", "route2b_heldout"):
        diff = _rel_diff(vanilla, knobs(arm, "effective"))
        assert diff <= LATER_STEP_KNOB_TOL, f"{world}: {arm}'s as-trained knob left vanilla's ({diff:.2e})"
    for router in ("route2b", "route2b_heldout"):
        alone = knobs(router, router)
        assert max(abs(v) for v in alone) > 0, f"{router} should quarantine something"
        diff = max(abs(a - b) for a, b in zip(alone, knobs("two_routers", router))) / max(abs(v) for v in vanilla)
        assert diff <= LATER_STEP_KNOB_TOL, f"{world}: {router} on the shared run differs from its own run ({diff:.2e})"


@pytest.mark.parametrize("arm", ["route2b", "route2b_token", "two_routers"])
def test_reduced_metrics_equal_one_rank(runs, arm):
    for step, ref in enumerate(runs["one"][arm]["steps"]):
        metrics = {k: v for k, v in ref["metrics"].items() if not any(local in k for local in LOCAL_METRICS)}
        routers = sorted({k.split("/")[1] for k in metrics if k.count("/") >= 2})
        for router in routers:
            for key in ("frout", "kept_grad_norm", "quarantine_grad_norm", *BAND_METRICS):
                assert f"gq/{router}/{key}" in metrics or key.startswith("refresh"), f"{arm}: {router}/{key}"
            if step == 0:
                assert metrics[f"gq/{router}/frout"] > 0.1 and metrics[f"gq/{router}/quarantine_grad_norm"] > 0, (
                    f"{arm} step 1: the planted pairs should route gradient mass: {metrics}"
                )
        for rank, run in enumerate(runs["two"]):
            got = run[arm]["steps"][step]["metrics"]
            for key, value in metrics.items():
                # the knob norms after the update carry Adam's division by the second moment: the knobs' tolerance
                tol = LATER_STEP_KNOB_TOL if key.endswith("/quarantine_to_effective_norm") else TOL
                assert abs(got[key] - value) <= tol * max(1.0, abs(value)), (
                    f"{arm} step {step} rank {rank}: {key} = {got[key]!r}, 1 rank: {value!r}"
                )


@pytest.mark.parametrize("arm", ["route2b", "route2b_token", "two_routers"])
def test_every_rank_holds_the_same_directions_and_bands_as_one_rank(runs, arm):
    ref = runs["one"][arm]["routing_state"]
    assert any(".direction." in k for k in ref) and any(k.endswith(".band") for k in ref), sorted(ref)
    rank0, rank1 = (run[arm]["routing_state"] for run in runs["two"])
    assert rank0 == rank1, f"{arm}: the two ranks should hold bit-identical directions, bands and step counter"
    assert sorted(rank0) == sorted(ref)
    assert rank0["optimizer_steps"] == ref["optimizer_steps"] == [float(len(runs["one"][arm]["steps"]))]
    for key, tensor in ref.items():
        diff = max(abs(a - b) for a, b in zip(tensor, rank0[key]))
        assert diff <= TOL, f"{arm}: {key} differs from 1 rank by {diff:.2e}"
    if arm == "route2b":  # refresh=1: every step's direction ran on every rank with knobs updated shard-wise
        for step in range(len(runs["one"][arm]["steps"])):
            assert "gq/route2b/refresh/seconds" in runs["two"][0][arm]["steps"][step]["metrics"]
