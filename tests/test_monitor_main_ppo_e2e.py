"""The monitor arms end to end through `python -m verl.trainer.main_ppo` on CPU, on the shipped model organism: the
probe with screening (refitted every step) and the label monitor with a penalty. What it shows: the recipes compose;
the trainer replaces verl's advantage with the monitored one every step; the probe is fitted on the organism's pairs
through the actor worker (policy activations) and refitted on schedule; the flag rate, recall and precision are
logged to verl and metrics.jsonl; the run's evaluation names its arm, a row of the report; the probe travels with
verl's checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARMS = {
    # run name -> (recipes, overrides)
    "screening_probe": ("recipes/organism_screening_probe,recipes/organism_cpu",
                        ["actor_rollout_ref.actor.fsdp_config.gq.monitor.refit=1"]),
    "penalty_gt_labels90": ("recipes/organism_screening_gt_labels90,recipes/organism_cpu",
                            ["actor_rollout_ref.actor.fsdp_config.gq.monitor.intervention=penalty"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_main_ppo) -> dict:
    from verl_gq.organism import data as organism_data

    tmp = tmp_path_factory.mktemp("monitor_e2e")
    organism_data.write(tmp / "organism", n_train=32, test_per_mode=2, seed=0, small_per_mode=2, token_stats=False,
                        final_per_mode=2)
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_GQ_ORGANISM_DATA": str(tmp / "organism"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for run, (recipes, overrides) in ARMS.items():
        run_main_ppo([f"+recipe=[{recipes}]", *overrides,
                      f"actor_rollout_ref.actor.fsdp_config.gq.run_dir={tmp / 'runs' / run}",
                      f"trainer.default_local_dir={tmp / 'checkpoints' / run}",
                      "trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.save_freq=2",
                      "trainer.logger=[console,file]"],
                     {**env, "VERL_FILE_LOGGER_PATH": str(tmp / f"{run}_steps.jsonl")}, tmp, timeout=600)
    return {"tmp": tmp}


def steps(tmp: Path, run: str) -> list[dict]:
    rows = [json.loads(line) for line in (tmp / f"{run}_steps.jsonl").read_text().splitlines() if line.strip()]
    return [row["data"] for row in rows if row["step"] >= 1]


def test_every_step_logs_the_flags_and_the_probe_refits_on_schedule(runs):
    probe, labels = steps(runs["tmp"], "screening_probe"), steps(runs["tmp"], "penalty_gt_labels90")
    assert len(probe) == len(labels) == 2
    for row in probe + labels:
        assert 0.0 <= row["gq/monitor/flag_rate"] <= 1.0
    # refit=1: the probe is fitted on the pairs at step 1 and again at step 2, on that step's policy
    for row in probe:
        assert 0.0 <= row["gq/monitor/probe/heldout_fpr"] <= 0.05, "the threshold's false-positive rate on held-out pairs"
        assert 0.0 <= row["gq/monitor/probe/heldout_auc"] <= 1.0
    assert not any(k.startswith("gq/monitor/probe/") for row in labels for k in row), "the label monitor fits nothing"


def test_runs_name_their_arm_and_keep_the_monitor_metrics(runs):
    from verl_gq.eval.artifacts import RunDir
    from verl_gq.eval.report.collect import arm_names

    for run, arm in (("screening_probe", "screening_probe"), ("penalty_gt_labels90", "penalty_gt_labels90")):
        run_dir = RunDir(runs["tmp"] / "runs" / run)
        deploy = run_dir.read_deploy()
        assert deploy.monitor == arm and deploy.routers == {} and arm_names(deploy) == [arm]
        train = [r for r in run_dir.read_metrics() if r.kind == "train"]
        assert [r.step for r in train] == [1, 2]
        assert all("gq/monitor/flag_rate" in r.extra for r in train)
    state = json.loads((runs["tmp"] / "checkpoints" / "screening_probe" / "global_step_2" / "gq_monitor.json")
                       .read_text())
    assert state["step"] == 2 and state["layer"] == 3, "fitted at step 2 on the middle of the organism's 6 layers"
    assert not (runs["tmp"] / "checkpoints" / "penalty_gt_labels90" / "global_step_2" / "gq_monitor.json").exists()


def test_the_report_has_a_row_per_monitor_arm(runs, tmp_path):
    import subprocess
    import sys

    import pandas as pd

    result = subprocess.run([sys.executable, "-m", "verl_gq.cli", "report", str(runs["tmp"] / "runs"), "--out",
                             str(tmp_path), "--baseline", "penalty_gt_labels90"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    keynote = pd.read_csv(next(tmp_path.glob("*keynote*.csv")))
    assert sorted(keynote["arm"]) == ["penalty_gt_labels90", "screening_probe"]
