"""scripts/bench_route2b.py runs end to end on the tiny CPU shape and measures what it says it does (not a timed
test: no assertion on speed, only that every arm, region, profile and refresh was measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_route2b.py"


def test_cpu_benchmark_measures_every_arm_route2b_region_and_the_refresh(tmp_path, checkout_pythonpath):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": checkout_pythonpath, "VERL_PLATFORM": "cpu"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--repeats", "2", "--checkpointing", "on",
                          "--json", str(out), "--profile", str(tmp_path / "profile"), "--gather-arm"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "paired x" in run.stdout and "route2b's own code" in run.stdout and "direction refresh" in run.stdout
    (result,) = json.loads(out.read_text())["results"]
    routed = ("route2b", "route2b_token", "route2b_gather")  # the last: route2b by the packed batches' gather
    assert set(result["times"]) == {"vanilla", *routed}
    assert all(len(t) == 2 and min(t) > 0 for t in result["times"].values())
    regions = result["regions"]
    own = ("gate+route", "reduce", "write", "segments")
    assert all(regions["vanilla"][name] == 0 for name in own), f"vanilla runs none of route2b's code: {regions}"
    for arm in ("vanilla", *routed):
        assert regions[arm]["apply"] > 0 and regions[arm]["optimizer"] > 0, (arm, regions[arm])
    for arm in routed:
        assert all(regions[arm][name] > 0 for name in own), (arm, regions[arm])
    assert len(result["refresh"]) == 1 and result["refresh"][0] > 0
    n_modules = result["knobs_stepped"]["vanilla"]
    assert n_modules > 0 and result["knobs_stepped"] == {arm: n_modules for arm in result["times"]}, (
        f"every arm should step the same knob tensors, one per module: {result['knobs_stepped']}")
    for arm in ("vanilla", *routed):  # one step per arm under torch.profiler
        profile = result["profiles"][arm]
        assert profile["ops"] > 0 and profile["regions_host"]["apply"] > 0, (arm, profile)
        assert "sorted by self_cpu_time_total" in (tmp_path / "profile" / f"r8_ckpton_{arm}.txt").read_text()
    assert "gate+route" in result["profiles"]["route2b"]["regions_host"]
    # --report prints the same tables again from the saved file, with no run
    again = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-4000:]
    tables = [line for line in again.stdout.splitlines()[1:] if line.strip()]
    assert len(tables) >= 8 and set(tables) <= set(run.stdout.splitlines()), (again.stdout, run.stdout)
