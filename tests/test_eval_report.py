"""Tables, figures and the report command on synthetic run folders with known answers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import save_file
from scipy import stats

from reward.modes import MODES
from verl_gq.eval.report.collect import collect_runs
from verl_gq.eval.report.figures import default_long_run_arms, long_run, training_curves
from verl_gq.eval.artifacts.run_dir import RunDir, record_deploy_evaluation
from verl_gq.eval.artifacts.schema import (
    BandBounds,
    CosStats,
    DeployEval,
    EvalBlock,
    ModeStats,
    RouterEval,
    RouterStep,
    TrainRow,
)
from verl_gq.eval.report.stats import holm, mean_sem, paired_t_test, prompt_clustered_se
from verl_gq.eval.report.tables import ablation_table, held_out_table, keynote_table

REPO = Path(__file__).resolve().parents[1]
N_PROMPTS, GROUP = 8, 2
N = N_PROMPTS * GROUP  # 16 samples per evaluation
PER_MODE_N = N // len(MODES)  # 4


def spread(total: int) -> list[int]:
    """`total` counts over the four modes as evenly as possible, the first modes first."""
    base, extra = divmod(total, len(MODES))
    return [base + (i < extra) for i in range(len(MODES))]


def block(hack: list[int], solve: list[int]) -> EvalBlock:
    return EvalBlock(overall=ModeStats.from_counts(sum(hack), sum(solve), N),
                     by_mode={m: ModeStats.from_counts(h, s, PER_MODE_N) for m, h, s in zip(MODES, hack, solve)})


def write_run(root: Path, name: str, *, arm: str, seed: int, hack: int | None = None,
              hack_by_mode: list[int] | None = None, solve: int = 2, steps: int = 4, frout: float = 0.25,
              held_out: tuple[str, ...] = (), temperature: float = 0.7, gq: dict | None = None,
              routers: dict[str, int] | None = None, with_samples: bool = False,
              git_commit: str | None = "abc123") -> RunDir:
    """A complete run through the real writers. arm "vanilla": a run without routers whose as-trained deploy hack is
    as given. Any other arm: a run with that router (deploy hack as given, as-trained deploy hack = it + 2, router
    config `gq`, held-out modes `held_out`) and the further `routers` ({name: deploy hack}). Train rows 1..steps
    (as-trained hack = seed + step), eval rows at steps/2 and the end, solve = `solve` everywhere; train.safetensors
    is written first and its hash recorded. `with_samples`: per_sample_deploy.parquet too (`samples_of`)."""
    run = RunDir(root / name)
    deploy_hack = hack_by_mode if hack_by_mode is not None else spread(hack)
    named = {} if arm == "vanilla" else {arm: deploy_hack, **{r: spread(h) for r, h in (routers or {}).items()}}
    router_config = {r: {"granularity": "rollout", "direction": "pairs", "band": "calibrated", "refresh": 5,
                         "direction_modes": [], **(gq or {} if r == arm else {})} for r in named}
    config = {"rank": 8, "seed": seed, "run_dir": str(run.path), "routers": router_config}
    run.path.mkdir(parents=True)
    save_file({"effective_knob": torch.zeros(3)}, str(run.train_file),
              metadata={"resolved_config": json.dumps({"actor_rollout_ref": {"actor": {"fsdp_config": {"gq": config}}}}),
                        "routers": json.dumps(list(named)), "seed": str(seed), "step": str(steps)})
    as_trained_hack = deploy_hack if arm == "vanilla" else spread(sum(deploy_hack) + 2)
    log = run.open_metrics_log()
    for step in range(1, steps + 1):
        routed = RouterStep(frout=frout, cos=CosStats(mean=0.1, std=0.2, min=-0.5, max=0.6),
                            band=BandBounds(lower=0.0, upper=0.3), kept_grad_norm=1.0, quarantine_grad_norm=0.5,
                            direction_refreshed=step % 5 == 1)
        log.append(TrainRow(step=step, time=float(step), reward_mean=1.0, as_trained=block(spread(seed + step),
                            spread(solve)), grad_norm=1.2, routers={r: routed for r in named}))
        if step in (steps // 2, steps):
            views = {"as_trained": (as_trained_hack, spread(solve)), **{r: (h, spread(solve)) for r, h in named.items()}}
            samples = pd.concat([samples_of(view, step, *counts) for view, counts in views.items()],
                                ignore_index=True) if with_samples else None
            record_deploy_evaluation(run, log, DeployEval(
                run=name, seed=seed, step=step, model="tiny-qwen2", n_prompts=N_PROMPTS, group=GROUP,
                temperature=temperature, eval_modes=list(MODES), names_randomised=True,
                as_trained=block(as_trained_hack, spread(solve)),
                routers={r: RouterEval(held_out_modes=list(held_out) if r == arm else [],
                                       deployed=block(h, spread(solve))) for r, h in named.items()},
                train_content_sha256=run.train_content_sha256(), created_at="2025-06-01T12:00:00+00:00",
                git_commit=git_commit), samples)
    return run


def samples_of(view: str, step: int, hack: list[int], solve: list[int]) -> pd.DataFrame:
    """One view's per-sample outcomes with the given per-mode counts: mode m's 4 answers are prompts 2m and 2m + 1
    x 2 samples, the first `hack` of them hacks, the next `solve` solves."""
    rows = []
    for m, (mode, h, s) in enumerate(zip(MODES, hack, solve)):
        for i in range(PER_MODE_N):
            rows.append({"step": step, "view": view, "prompt": 2 * m + i // GROUP, "mode": mode, "sample": i % GROUP,
                         "solve": h <= i < h + s, "hack": i < h, "channel": i < h, "response_chars": 10})
    return pd.DataFrame(rows)


# Deploy hack counts out of 16 by seed. Paired differences route2b - vanilla: -4, -5, -3 (/16).
VANILLA_HACK = {0: 6, 1: 8, 2: 10}
ROUTE2B_HACK = {0: 2, 1: 3, 2: 7}


def write_keynote_runs(root: Path) -> None:
    for seed, hack in VANILLA_HACK.items():
        write_run(root, f"vanilla_s{seed}", arm="vanilla", seed=seed, hack=hack, frout=0.0)
    for seed, hack in ROUTE2B_HACK.items():
        write_run(root, f"route2b_s{seed}", arm="route2b", seed=seed, hack=hack)


# --- statistics ----------------------------------------------------------------------------------------------


def test_mean_and_sem_match_hand_computation():
    # values 2, 4, 9: mean 5, deviations -3, -1, 4, sum of squares 26, var 13, SEM sqrt(13/3)
    mean, sem = mean_sem([2.0, 4.0, 9.0])
    assert mean == 5.0 and math.isclose(sem, math.sqrt(13 / 3), rel_tol=1e-14)
    assert mean_sem([0.25]) == (0.25, None), "one value has no standard error"


def test_paired_t_test_matches_closed_forms_and_scipy():
    # 3 pairs, differences 1, 2, 6: mean 3, var 7, t = 3 / sqrt(7/3); t with 2 df has
    # two-sided p = 1 - t / sqrt(2 + t^2), so p = 1 - sqrt(27/41).
    base = {0: 10.0, 1: 20.0, 2: 30.0}
    arm = {0: 11.0, 1: 22.0, 2: 36.0}
    test = paired_t_test(arm, base)
    assert test.seeds == (0, 1, 2) and test.mean_diff == 3.0
    assert math.isclose(test.sem_diff, math.sqrt(7 / 3), rel_tol=1e-14)
    assert math.isclose(test.t, math.sqrt(27 / 7), rel_tol=1e-12)
    assert math.isclose(test.p, 1 - math.sqrt(27 / 41), rel_tol=1e-12), "p should equal the closed form for 2 df"
    assert math.isclose(test.p, stats.ttest_rel([11, 22, 36], [10, 20, 30]).pvalue, rel_tol=1e-12)
    # 2 pairs, differences 1, 3: t = 2 with 1 df (Cauchy): p = 1 - (2/pi) atan(2)
    two = paired_t_test({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})
    assert math.isclose(two.p, 1 - 2 / math.pi * math.atan(2.0), rel_tol=1e-12)
    # its 95% interval: mean 2 +- t(0.975, 1 df) x SEM 1, and t(0.975, 1 df) = tan(0.475 pi) (Cauchy quantile)
    half = math.tan(0.475 * math.pi)
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(two.ci95, (2 - half, 2 + half)))
    scipy_ci = stats.ttest_rel([11, 22, 36], [10, 20, 30]).confidence_interval(0.95)
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(test.ci95, (scipy_ci.low, scipy_ci.high)))
    # exact signed-rank: differences 1, 2, 6 all positive; of the 2^3 sign patterns only all-positive and
    # all-negative are as extreme, so p = 2/8
    assert math.isclose(test.p_wilcoxon, 0.25, rel_tol=1e-12)
    # the sign follows arm - baseline and seeds only in one arm are not paired
    swapped = paired_t_test({**base, 7: 0.0}, arm)
    assert swapped.mean_diff == -3.0 and swapped.n_pairs == 3 and math.isclose(swapped.p, test.p, rel_tol=1e-12)


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04: x3 = 0.03, x2 = 0.06, x1 = 0.04 -> kept monotone at 0.06
    assert holm({"a": 0.04, "b": 0.01, "c": 0.03}) == pytest.approx({"a": 0.06, "b": 0.03, "c": 0.06}, abs=1e-15)
    assert holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}, "capped at 1"
    assert holm({}) == {}


def test_prompt_clustered_se_by_hand():
    def samples(hacks: dict[int, list[int]]) -> pd.DataFrame:
        return pd.DataFrame([{"prompt": p, "hack": bool(h), "solve": False} for p, hs in hacks.items() for h in hs])

    # two seeds, three prompts, two samples each. Cells (arm - base mean per prompt): seed 41: 0.5, 0, 1;
    # seed 42: 0, 0.5, 0.5 -> clusters 0.25, 0.25, 0.75: std 0.288675.. / sqrt(3)
    arm = {41: samples({0: [1, 0], 1: [0, 0], 2: [1, 1]}), 42: samples({0: [0, 0], 1: [1, 0], 2: [1, 0]})}
    base = {41: samples({0: [0, 0], 1: [0, 0], 2: [0, 0]}), 42: samples({0: [0, 0], 1: [0, 0], 2: [0, 0]})}
    expected = np.std([0.25, 0.25, 0.75], ddof=1) / math.sqrt(3)
    assert math.isclose(prompt_clustered_se(arm, base, "hack"), expected, rel_tol=1e-12)
    assert prompt_clustered_se({41: arm[41]}, {41: base[41]}, "hack") is None, "one seed: no SE"
    other = {**base, 42: samples({0: [0, 0], 1: [0, 0], 5: [0, 0]})}
    assert prompt_clustered_se(arm, other, "hack") is None, "the views must share the prompts"


def test_paired_t_test_says_na_instead_of_a_number_when_it_cannot_run():
    one = paired_t_test({0: 0.5, 1: 0.4}, {0: 0.7})
    assert (one.p, one.note, one.mean_diff) == (None, "n/a (n<2 pairs)", pytest.approx(-0.2))
    assert paired_t_test({1: 0.5}, {0: 0.7}).note == "n/a (no seed in common)"
    same = paired_t_test({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5})
    assert same.p is None and same.note == "n/a (all paired differences equal)"


# --- tables --------------------------------------------------------------------------------------------------


def test_keynote_table_has_the_known_means_sems_deltas_and_p(tmp_path):
    write_keynote_runs(tmp_path)
    write_run(tmp_path, "lone_s0", arm="lone", seed=0, hack=1)
    runset = collect_runs(tmp_path, expected_seeds=[0])
    table = keynote_table(runset, baseline="vanilla", alpha=0.05)
    rows = table.frame.set_index("arm")
    van, r2b = rows.loc["vanilla"], rows.loc["route2b"]
    assert van.deploy_hack_mean == pytest.approx(8 / 16, abs=1e-15)
    assert van.deploy_hack_sem == pytest.approx(math.sqrt(4 / 256) / math.sqrt(3), rel=1e-12)  # sd of 6,8,10 is 2
    assert r2b.deploy_hack_mean == pytest.approx(4 / 16, abs=1e-15)
    # differences -4, -5, -3 (/16): mean -4/16, sd 1/16, SEM 1/16/sqrt(3), t = -4 sqrt(3), p = 1 - t/sqrt(2+t^2)
    t = -4 * math.sqrt(3)
    assert r2b.delta_hack == pytest.approx(-0.25, abs=1e-15)
    assert r2b.delta_hack_sem == pytest.approx(1 / 16 / math.sqrt(3), rel=1e-12)
    assert r2b.p_hack == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-10)
    assert r2b.p_hack == pytest.approx(stats.ttest_rel([2, 3, 7], [6, 8, 10]).pvalue, rel=1e-12)
    assert r2b.n_pairs_hack == 3 and r2b.n_seeds == 3 and r2b.alpha == 0.05
    assert r2b.note_solve == "n/a (all paired differences equal)" and pd.isna(r2b.p_solve)
    assert "alpha = 0.05" in table.markdown and "ttest_rel" in table.markdown and "(n=3)" in table.markdown
    assert "0.0202 *" in table.markdown, "p < alpha should be marked"


def test_keynote_clusters_by_prompt_from_the_runs_per_sample_outcomes_and_adjusts_by_holm(tmp_path):
    for seed, hack in VANILLA_HACK.items():
        write_run(tmp_path, f"vanilla_s{seed}", arm="vanilla", seed=seed, hack=hack, frout=0.0, with_samples=True)
    for seed, hack in ROUTE2B_HACK.items():
        write_run(tmp_path, f"route2b_s{seed}", arm="route2b", seed=seed, hack=hack, with_samples=True)
    runset = collect_runs(tmp_path)
    frame = keynote_table(runset, "vanilla", 0.05).frame.set_index("arm")
    row = frame.loc["route2b"]
    by_seed = {arm: {r.seed: r.samples for r in runset.arms[arm]} for arm in ("route2b", "vanilla")}
    assert all(len(s) == N for s in by_seed["route2b"].values()), "each arm reads its own view's samples"
    expected = prompt_clustered_se(by_seed["route2b"], by_seed["vanilla"], "hack")
    assert expected is not None and row["delta_hack_se_prompt"] == expected
    compared = frame["p_hack"].dropna()  # route2b and route2b:as_trained against vanilla
    assert len(compared) == 2 and frame["p_hack_holm"].dropna().to_dict() == holm(compared.to_dict())
    bare = keynote_table(collect_runs(write_keynote_runs(tmp_path / "bare") or tmp_path / "bare"), "vanilla", 0.05)
    assert pd.isna(bare.frame.set_index("arm").loc["route2b", "delta_hack_se_prompt"]), "no samples: n/a"


def test_preregistered_tables_hold_only_runs_made_after_the_preregistration(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    commits = []
    for name in ("before", "prereg", "after"):
        (repo / name).write_text(name)
        git("add", name)
        git("commit", "-qm", name)
        commits.append(git("rev-parse", "HEAD"))
    before, prereg, after = commits
    runs = tmp_path / "runs"
    for seed, commit in ((0, prereg), (1, after), (2, before), (3, f"{after}-dirty"), (4, None)):
        write_run(runs, f"vanilla_s{seed}", arm="vanilla", seed=seed, hack=4, git_commit=commit)
    runset = collect_runs(runs, after_commit=prereg, repo=repo)
    assert [r.seed for r in runset.arms["vanilla"]] == [0, 1], "the preregistration's own commit and later ones"
    why = {p.subject: p.message for p in runset.problems if p.excluded}
    assert why == {
        "run vanilla_s2": f"not a preregistered run: its commit {before} does not descend from {prereg}",
        "run vanilla_s3": f"not a preregistered run: it ran with uncommitted changes on top of {after}",
        "run vanilla_s4": f"not a preregistered run: its evaluation records no source commit: it cannot be shown to "
                          f"follow {prereg}"}
    assert len(collect_runs(runs).arms["vanilla"]) == 5, "without the option every complete run counts"


def test_the_routers_of_one_run_are_arms_paired_by_seed_with_the_run_as_trained(tmp_path):
    """A study run per seed with routers route2b and random_v: three arms per run (each router's deployed model and
    study:as_trained, the default baseline), compared pairwise by seed."""
    random_v = {0: 5, 1: 6, 2: 9}
    for seed, hack in ROUTE2B_HACK.items():
        write_run(tmp_path, f"study_s{seed}", arm="route2b", seed=seed, hack=hack, routers={"random_v": random_v[seed]})
    runset = collect_runs(tmp_path)
    assert sorted(runset.arms) == ["random_v", "route2b", "study:as_trained"] and not runset.problems
    from verl_gq.eval.report.collect import default_baseline

    baseline = default_baseline(list(runset.arms))
    assert baseline == "study:as_trained"
    rows = keynote_table(runset, baseline, 0.05).frame.set_index("arm")
    # as trained = route2b's deployed hack + 2 (write_run): route2b - as_trained = -2/16 on every seed
    assert rows.loc["route2b", "delta_hack"] == pytest.approx(-2 / 16, abs=1e-15)
    assert rows.loc["random_v", "delta_hack"] == pytest.approx(
        np.mean([random_v[s] - ROUTE2B_HACK[s] - 2 for s in (0, 1, 2)]) / 16, abs=1e-15)
    versus_random = keynote_table(runset, "random_v", 0.05).frame.set_index("arm").loc["route2b"]
    assert versus_random.p_hack == pytest.approx(stats.ttest_rel([2, 3, 7], [5, 6, 9]).pvalue, rel=1e-12)
    assert runset.arms["random_v"][0].train.frout.tolist() == [0.25] * 4, "each arm's own routed fraction"


def test_a_run_written_before_routers_is_its_one_arm(tmp_path):
    """Schema-1 files (per_mode_deploy.json with `arm`, metrics rows with knob_grad_norm, a train file naming `arm`)
    are read as that one arm, with their own numbers."""
    run = write_run(tmp_path, "route2b_s0", arm="route2b", seed=0, hack=3)
    deploy = json.loads(run.deploy_file.read_text())
    old = {k: v for k, v in deploy.items() if k not in ("routers", "train_content_sha256", "legacy_arm")}
    old.update(schema_version=1, arm="route2b", held_out_modes=[], deployed=deploy["routers"]["route2b"]["deployed"])
    run.deploy_file.write_text(json.dumps(old))
    lines = []
    for line in run.metrics_file.read_text().splitlines():
        row = json.loads(line)
        row["schema_version"] = 1
        if row["kind"] == "train":
            routed = row.pop("routers")["route2b"]
            row.pop("grad_norm")
            row.update(frout=routed["frout"], cos=routed["cos"], band=routed["band"],
                       knob_grad_norm={"keep": routed["kept_grad_norm"], "quarantine": routed["quarantine_grad_norm"]},
                       direction_refreshed=routed["direction_refreshed"])
        elif row["kind"] == "eval":
            row["deployed"] = row.pop("routers")["route2b"]
        lines.append(json.dumps(row))
    run.metrics_file.write_text("\n".join(lines) + "\n")
    config = {"actor_rollout_ref": {"actor": {"fsdp_config": {"gq": {"method": "route2b", "granularity": "rollout",
                                                                    "band_mode": "calibrated", "refresh": 5}}}}}
    save_file({"keep_knob": torch.zeros(3)}, str(run.train_file),
              metadata={"resolved_config": json.dumps(config), "arm": "route2b", "seed": "0", "step": "4"})
    runset = collect_runs(tmp_path)
    assert list(runset.arms) == ["route2b"] and not runset.problems, runset.problems
    arm = runset.arms["route2b"][0]
    assert arm.deploy.deployed.overall.hack == 3 / 16 and arm.router["band"] == "calibrated"


def test_single_seed_arm_is_shown_but_never_compared_with_multi_seed_arms(tmp_path):
    write_keynote_runs(tmp_path)
    write_run(tmp_path, "lone_s0", arm="lone", seed=0, hack=1)
    runset = collect_runs(tmp_path, expected_seeds=[0])
    lone = keynote_table(runset, "vanilla", 0.05).frame.set_index("arm").loc["lone"]
    assert lone.deploy_hack_mean == 1 / 16 and pd.isna(lone.deploy_hack_sem)
    assert pd.isna(lone.delta_hack) and pd.isna(lone.p_hack) and lone.note_hack == "n/a (single seed: not compared)"
    held = held_out_table(runset, "vanilla", 0.05).frame
    assert held[held.arm == "lone"].delta_hack.isna().all()


def test_arm_evaluated_under_other_settings_is_not_compared(tmp_path):
    write_keynote_runs(tmp_path)
    for seed in (0, 1):
        write_run(tmp_path, f"hot_s{seed}", arm="hot", seed=seed, hack=2, temperature=1.0)
    runset = collect_runs(tmp_path, expected_seeds=[0, 1])
    hot = keynote_table(runset, "vanilla", 0.05).frame.set_index("arm").loc["hot"]
    assert hot.note_hack == "n/a (eval settings differ from baseline: temperature)" and pd.isna(hot.p_hack)


def test_ablation_table_reports_config_knob_effect_and_frout(tmp_path):
    write_keynote_runs(tmp_path)
    rows = ablation_table(collect_runs(tmp_path), "vanilla").frame.set_index("arm")
    assert rows.loc["route2b", "band"] == "calibrated" and pd.isna(rows.loc["vanilla", "band"])
    assert rows.loc["route2b", "knob_effect_hack_mean"] == pytest.approx(2 / 16, abs=1e-15), "as-trained = deployed + 2"
    assert rows.loc["route2b", "knob_effect_hack_sem"] == 0.0
    assert rows.loc["route2b", "frout_mean"] == 0.25 and rows.loc["vanilla", "frout_mean"] == 0.0
    assert rows.loc["route2b", "as_trained_hack_mean"] == pytest.approx(6 / 16, abs=1e-15)


def test_held_out_table_flags_modes_and_compares_per_mode(tmp_path):
    write_keynote_runs(tmp_path)
    held_out = ("sentinel", "file_marker")
    write_run(tmp_path, "ho_s0", arm="heldout", seed=0, hack_by_mode=[0, 1, 3, 3], held_out=held_out)
    write_run(tmp_path, "ho_s1", arm="heldout", seed=1, hack_by_mode=[1, 0, 2, 2], held_out=held_out)
    frame = held_out_table(collect_runs(tmp_path, expected_seeds=[0, 1]), "vanilla", 0.05).frame
    rows = frame[frame.arm == "heldout"].set_index("mode")
    assert rows.direction.to_dict() == {"run_tests": "held-in", "stdout_marker": "held-in",
                                        "sentinel": "held-out", "file_marker": "held-out"}
    assert (frame[frame.arm == "vanilla"].direction == "held-in").all(), "no held-out modes: every mode held in"
    # sentinel hacks: heldout 3, 2 of 4; vanilla seeds 0, 1 have spread(6)[2] = 1 and spread(8)[2] = 2
    assert rows.loc["sentinel", "deploy_hack_mean"] == pytest.approx(5 / 8, abs=1e-15)
    assert rows.loc["sentinel", "delta_hack"] == pytest.approx(((3 - 1) / 4 + (2 - 2) / 4) / 2, abs=1e-15)
    assert rows.loc["sentinel", "p_hack"] == pytest.approx(stats.ttest_rel([3 / 4, 2 / 4], [1 / 4, 2 / 4]).pvalue)


# --- problems ------------------------------------------------------------------------------------------------


def test_missing_and_incomplete_runs_are_named_and_left_out(tmp_path):
    write_keynote_runs(tmp_path)
    (tmp_path / "never_started").mkdir()
    broken = write_run(tmp_path, "route2b_s3", arm="route2b", seed=3, hack=2)
    data = json.loads(broken.deploy_file.read_text())
    del data["routers"]["route2b"]["deployed"]["overall"]["solve"]
    broken.deploy_file.write_text(json.dumps(data))
    gap = write_run(tmp_path, "route2b_s4", arm="route2b", seed=4, hack=2)
    lines = gap.metrics_file.read_text().splitlines()
    gap.metrics_file.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop the train row of step 2
    crashed = write_run(tmp_path, "route2b_s5", arm="route2b", seed=5, hack=2)
    lines = crashed.metrics_file.read_text().splitlines()
    crashed.metrics_file.write_text("\n".join(lines[:-2]) + "\n")  # log ends before the deploy step
    write_run(tmp_path, "route2b_s0_again", arm="route2b", seed=0, hack=2)
    write_run(tmp_path, "vanilla_s6", arm="vanilla", seed=6, hack=2, temperature=1.0)
    changed = write_run(tmp_path, "route2b_s7", arm="route2b", seed=7, hack=2)
    save_file({"effective_knob": torch.ones(3)}, str(changed.train_file),
              metadata=dict(__import__("safetensors").safe_open(str(changed.train_file), "pt").metadata()))

    runset = collect_runs(tmp_path)
    problems = {p.subject: p for p in runset.problems}
    expected = {
        "run never_started": "no deploy evaluation",
        "run route2b_s3": "missing field 'routers.route2b.deployed.overall.solve'",
        "run route2b_s4": "steps 2..2 missing",
        "run route2b_s5": "train rows of",
        "run route2b_s0": "claimed by runs ['route2b_s0', 'route2b_s0_again']",
        "run route2b_s0_again": "claimed by runs",
        "run vanilla_s6": "['temperature'] differ from the other seeds' [0.7]",
        "run route2b_s7": "the knobs changed after the evaluation",
    }
    for subject, fragment in expected.items():
        assert subject in problems and fragment in problems[subject].message and problems[subject].excluded, \
            f"{subject} should be reported with '{fragment}'; problems: {[str(p) for p in runset.problems]}"
    assert [r.seed for r in runset.arms["route2b"]] == [1, 2], "only complete, unique, comparable runs remain"
    assert problems["arm route2b"].message == "no complete run for seeds [0] (expected seeds [0, 1, 2])"
    assert not problems["arm route2b"].excluded
    assert set(runset.excluded_runs) == {s.removeprefix("run ") for s in expected}


def test_seeds_without_a_strict_majority_of_settings_leave_the_arm_out(tmp_path):
    write_run(tmp_path, "a_s0", arm="a", seed=0, hack=2)
    write_run(tmp_path, "a_s1", arm="a", seed=1, hack=2, gq={"refresh": 0})
    runset = collect_runs(tmp_path)
    assert "a" not in runset.arms
    assert all("no strict majority" in p.message for p in runset.problems if p.subject.startswith("run a_"))


# --- figures and the report command --------------------------------------------------------------------------


def test_training_curves_csv_holds_the_plotted_band(tmp_path):
    runs = tmp_path / "runs"
    write_keynote_runs(runs)
    out = tmp_path / "report"
    out.mkdir()
    png, csv = training_curves(collect_runs(runs), out)
    band = pd.read_csv(csv)
    point = band[(band.arm == "vanilla") & (band.source == "as_trained") & (band.metric == "hack") & (band.step == 3)]
    values = [(seed + 3) / 16 for seed in (0, 1, 2)]  # as-trained hack = seed + step
    assert point.n_seeds.item() == 3 and point["mean"].item() == pytest.approx(np.mean(values), abs=1e-15)
    assert point["sem"].item() == pytest.approx(np.std(values, ddof=1) / math.sqrt(3), rel=1e-12)
    deployed = band[(band.arm == "route2b") & (band.source == "deployed") & (band.metric == "hack")]
    assert deployed.step.tolist() == [2, 4] and deployed["mean"].tolist() == pytest.approx([0.25, 0.25])
    assert png.stat().st_size > 10_000


def test_long_run_figure_plots_each_run_and_defaults_to_arms_past_the_baseline(tmp_path):
    write_keynote_runs(tmp_path / "runs")
    write_run(tmp_path / "runs", "long_s0", arm="route2b_long", seed=0, hack=3, steps=12)
    runset = collect_runs(tmp_path / "runs")
    assert default_long_run_arms(runset, "vanilla") == ["long:as_trained", "route2b_long"]
    png, csv = long_run(runset, ["route2b_long", "vanilla"], tmp_path)
    series = pd.read_csv(csv)
    assert set(series.run) == {"long_s0", "vanilla_s0", "vanilla_s1", "vanilla_s2"}, "each run drawn on its own"
    assert series[(series.run == "long_s0") & (series.source == "as_trained")].step.max() == 12
    with pytest.raises(ValueError, match="have no complete runs"):
        long_run(runset, ["nope"], tmp_path)


def test_report_command_writes_every_table_figure_and_names_every_problem(tmp_path):
    runs = tmp_path / "out" / "runs"
    write_keynote_runs(runs)
    write_run(runs, "long_s0", arm="route2b_long", seed=0, hack=3, steps=12)
    (runs / "never_started").mkdir()
    result = subprocess.run([sys.executable, "-m", "verl_gq.cli", "report", str(runs), "--alpha", "0.1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "report"
    for name in ("keynote", "ablation", "held_out_modes"):
        assert len(pd.read_csv(out / f"{name}.csv")) > 0 and "|" in (out / f"{name}.md").read_text()
    assert "alpha = 0.1" in (out / "keynote.md").read_text()
    for name in ("training_curves", "long_run"):
        image = imread(out / f"{name}.png")
        assert image.shape[0] > 400 and image.shape[1] > 600, f"{name}.png should be a full figure"
        assert image[..., :3].std() > 0.05, f"{name}.png should not be blank"
        assert len(pd.read_csv(out / f"{name}.csv")) > 0
    problems = (out / "problems.txt").read_text()
    assert "EXCLUDED run never_started" in problems and "arm route2b_long: no complete run for seeds [1, 2]" in problems
    assert "PROBLEM EXCLUDED run never_started" in result.stderr
    assert "never_started" in (out / "report.md").read_text()
    from verl_gq.cli import main  # the same command in-process: one start-up is enough

    assert main(["report", str(runs), "--strict", "--out", str(tmp_path / "strict")]) == 1, \
        "--strict should fail when any run is left out"
    shutil.rmtree(runs / "never_started")
    assert main(["report", str(runs), "--strict", "--seeds", "0", "--out", str(tmp_path / "strict")]) == 0, \
        "--strict should pass once every run is complete and every expected seed present"
    assert (tmp_path / "strict" / "problems.txt").read_text() == ""
