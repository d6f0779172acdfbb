"""benchmarks/bench_routers.py runs end to end on the tiny CPU shape and measures what it says it does (not a timed
test: no assertion on speed, only that every arm, routing region, profile and refresh was measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_routers.py"


def test_cpu_benchmark_measures_every_arm_routing_region_and_the_refresh(tmp_path, checkout_pythonpath):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": checkout_pythonpath, "VERL_PLATFORM": "cpu"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--repeats", "1", "--json", str(out),
                          "--out-dir", str(tmp_path / "profile")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "paired x" in run.stdout and "routing regions" in run.stdout and "refresh of every direction" in run.stdout
    (result,) = json.loads(out.read_text())["results"]
    arms = ("vanilla", "route2b", "route2b_token", "study", "route2b_gather")
    assert tuple(result["times"]) == arms
    assert all(len(t) == 1 and min(t) > 0 for t in result["times"].values())
    n_modules = result["knobs_stepped"]["vanilla"]
    assert n_modules > 0 and result["knobs_stepped"] == {arm: n_modules for arm in arms}, (
        f"every arm should step the same knob tensors, one per module: {result['knobs_stepped']}")
    routing_regions = ("gq:route", "gq:finish", "gq:write", "gq:segments")
    vanilla = result["profiles"]["vanilla"]["regions_host"]
    assert all(vanilla[region] == 0 for region in routing_regions), f"vanilla routes nothing: {vanilla}"
    for arm in arms:
        profile = result["profiles"][arm]["regions_host"]
        assert profile["gq:optimizer"] > 0, (arm, profile)
        if arm != "vanilla":
            assert all(profile[region] > 0 for region in routing_regions), (arm, profile)
        assert "sorted by self_cpu_time_total" in (tmp_path / "profile" / f"r8_ckpton_{arm}.txt").read_text()
    assert len(result["refresh"]) == 1 and result["refresh"][0] > 0
    # --report prints the same tables again from the saved file, with no run
    again = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-4000:]
    tables = [line for line in again.stdout.splitlines()[1:] if line.strip()]
    assert len(tables) >= 8 and set(tables) <= set(run.stdout.splitlines()), (again.stdout, run.stdout)
