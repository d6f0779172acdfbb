"""Load: 1000 samples (10% hostile, floods of the result channel among them) graded in parallel; each scored exactly
once, in order, with the right verdict, and the grading process's memory flat. The same script grades 10,000 samples
for docs/sandbox.md (`python scripts/load_grader.py --samples 10000 --summary`). It runs as a subprocess under an
outer timeout because 10% of the programs are hostile.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reward.sandbox import isolation_problems

pytestmark = pytest.mark.skipif(bool(isolation_problems()), reason="; ".join(isolation_problems()))

N_SAMPLES = 1000
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "load_grader.py"


def test_a_thousand_samples_each_scored_once_in_order_with_correct_verdicts_and_flat_memory(checkout_pythonpath):
    driver = subprocess.run([sys.executable, str(SCRIPT), "--samples", str(N_SAMPLES), "--summary"],
                            capture_output=True, text=True, timeout=400, env={"PYTHONPATH": checkout_pythonpath,
                                                                               "PATH": "/usr/bin:/bin"})
    out = json.loads(driver.stdout)
    assert out["n_verdicts"] == N_SAMPLES and out["n_wrong"] == 0, (
        f"{out['n_wrong']} samples got the wrong verdict or execution count, e.g. {out['wrong'][:5]}\n"
        f"{driver.stderr[-2000:]}")
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert {"flood_one_record", "flood_empty_records", "sentinel_truthy"} <= set(out["hostile_kinds"])
    rss = out["rss_mib"]
    assert rss["peak_after_10pct"] - rss["at_10pct"] <= 16, f"the grader's memory should stay flat: {rss}"
    print(f"\nload: {N_SAMPLES} samples ({out['hostile']} hostile) graded in {out['elapsed_s']}s, all verdicts right, "
          f"grader memory {rss}")
