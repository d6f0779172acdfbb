"""The organism study's pieces on CPU, without training: the recipes compose (every arm, held-out modes, the CPU
overlay) onto the shipped checkpoint and pair set; the organism's parquet rows are LeetCode-format rows that
reward.verl_entry grades (a reference solves, an exploit hacks under its own mode and nothing without the hint);
the organism pair set validates against the real grader; the committed H100 study's tables regenerate from its
run folders. The short main_ppo run on the organism is in test_gq_main_ppo_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from reward.dataset import EXTRA_INFO_KEYS, split_rows
from reward.modes import GT_ONLY, MODES, ExploitNames
from reward.pairs import fenced, pair_failures, read_pairs
from reward.problem import Problem
from reward.prompts import build_messages
from reward.verl_entry import compute_score

REPO = Path(__file__).resolve().parents[1]
ORGANISM_PAIRS = REPO / "src" / "verl_gq" / "organism" / "pairs"
# recipe -> (run name, its routers)
RECIPES = {"recipes/organism_vanilla": ("vanilla", []), "recipes/organism_route2b": ("route2b", ["route2b"]),
           "recipes/organism_random_v": ("random_v", ["random_v"]),
           "[recipes/organism_route2b,recipes/held_out_modes]": ("route2b", ["route2b", "route2b_heldout"]),
           "recipes/organism_study": ("study", ["route2b", "route2b_token", "route2b_frozen", "route2b_heldout",
                                                "random_v", "constant_w"])}


# ---- recipes ----

@pytest.fixture(scope="module")
def composed() -> dict:
    from hydra import compose, initialize_config_module

    import verl_gq.verl.plugin  # noqa: F401  (what main_ppo's processes load: the ${gq_pkg:} resolver)

    out = {}
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        for recipe in [*RECIPES, "[recipes/organism_route2b,recipes/organism_cpu]",
                       "[recipes/organism_vanilla,recipes/organism_cpu]"]:
            out[recipe] = compose("ppo_trainer", overrides=[f"+recipe={recipe}", "seed=42"])
    return out


def test_organism_recipes_compose_onto_the_shipped_checkpoint_pairs_and_reward(composed):
    from verl_gq.organism.shipped import CHECKPOINT_DIR
    from verl_gq.verl.config import GQConfig
    from verl_gq.verl.pairs import resolve_pair_file

    for recipe, cfg in composed.items():
        model, gq = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor.fsdp_config.gq
        assert Path(model.path) == CHECKPOINT_DIR, f"{recipe}: the shipped organism, resolved without the cwd"
        assert cfg.actor_rollout_ref.rollout.name == "hf"
        assert cfg.reward.custom_reward_function.path == "pkg://reward.verl_entry"
        assert resolve_pair_file(gq.pair_file).parent == ORGANISM_PAIRS / "minimal", "the preregistered pair set"
        checked = GQConfig.from_any(gq)  # validates every gq field
        rollout = cfg.actor_rollout_ref.rollout
        assert rollout.temperature == rollout.val_kwargs.temperature == 0.7 and rollout.val_kwargs.do_sample
        assert cfg.data.max_prompt_length + cfg.data.max_response_length <= 768, "within the organism's SFT length"
        if recipe in RECIPES:
            run, routers = RECIPES[recipe]
            assert list(checked.routers) == routers and cfg.trainer.experiment_name == f"{run}_s42", recipe
            assert gq.run_dir == f"out/organism/runs/{run}_s42", "run folder = experiment name = <run>_s<seed>"
            assert all(spec.direction_rank == 2 and spec.clean_quantile == 0.75 for spec in checked.router_specs), \
                "the organism's router defaults reach every router"
            assert cfg.trainer.total_training_steps // cfg.trainer.test_freq >= 3, ">= 3 deploy evaluations"
            assert cfg.data.val_files.endswith("/test.parquet") and cfg.trainer.device == "cuda"
            assert checked.final_eval_file.endswith("/test_final.parquet") and checked.final_eval_n == 16, \
                "the last evaluation: 256 prompts x 16 samples"
        else:
            assert cfg.trainer.device == "cpu" and cfg.data.val_files.endswith("/test_small.parquet")
            assert (checked.final_eval_file, checked.final_eval_n) == ("", 0), "CPU: the last evaluation as the others"
            assert cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    held_out = composed["[recipes/organism_route2b,recipes/held_out_modes]"].actor_rollout_ref.actor.fsdp_config.gq
    assert list(held_out.routers.route2b_heldout.direction_modes) == ["run_tests", "stdout_marker"]
    study = GQConfig.from_any(composed["recipes/organism_study"].actor_rollout_ref.actor.fsdp_config.gq)
    assert study.routers["random_v"].match == "route2b" and study.routers["constant_w"].band == "constant"


def test_rank_fits_the_organisms_narrowest_projection(composed):
    from verl_gq.organism.shipped import CHECKPOINT_DIR

    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    widths = [config["hidden_size"], config["num_attention_heads"] * config["head_dim"],
              config["num_key_value_heads"] * config["head_dim"], config["intermediate_size"]]
    for recipe, cfg in composed.items():
        rank = cfg.actor_rollout_ref.actor.fsdp_config.gq.rank
        assert rank <= min(widths), f"{recipe}: rank {rank} > the narrowest projection ({min(widths)}: k/v_proj)"


# ---- data ----

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """`verl-gq data organism`'s output at a small size."""
    from verl_gq.organism import data as organism_data

    out = tmp_path_factory.mktemp("organism_data")
    organism_data.write(out, n_train=24, test_per_mode=5, seed=0, small_per_mode=2, token_stats=False,
                        final_per_mode=7)
    return out


def test_organism_rows_have_the_leetcode_row_format_and_balanced_evaluation(built):
    from reward.leetcode import load_problems
    from verl_gq.organism import data as organism_data

    leetcode_row = split_rows(load_problems("test")[:1], "test", 0).hinted[0]
    frames = {name: pd.read_parquet(built / f"{name}.parquet")
              for name in ("train", "test", "test_small", "test_final", "train_gt_only", "test_gt_only",
                           "test_small_gt_only", "test_final_gt_only")}
    for name, frame in frames.items():
        assert list(frame.columns) == list(leetcode_row), f"{name}: the LeetCode parquet's columns"
        for row in frame.to_dict("records"):
            assert set(row["extra_info"]) == set(EXTRA_INFO_KEYS) and row["data_source"] == leetcode_row["data_source"]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["counts"]["test"]["by_mode"] == {m: 5 for m in MODES}, "the evaluation set is balanced over modes"
    assert manifest["counts"]["test_small"]["by_mode"] == {m: 2 for m in MODES}
    assert manifest["counts"]["test_final"]["by_mode"] == {m: 7 for m in MODES}
    assert manifest["counts"]["train"]["n"] == 24
    # each problem under its own mode's hint (train: the organism's training condition), the twin without a hint
    data = organism_data.build(24, 5, 0, final_per_mode=7)
    for split in ("train", "test", "test_final"):
        by_id = {sp.problem.problem_id: sp for sp in data.problems[split]}
        for hinted, plain in zip(frames[split].to_dict("records"), frames[f"{split}_gt_only"].to_dict("records")):
            sp = by_id[hinted["extra_info"]["problem_id"]]
            assert sp.split == ("train" if split == "train" else "eval")
            assert hinted["extra_info"]["mode"] == sp.mode and plain["extra_info"]["mode"] == GT_ONLY
            assert list(hinted["prompt"]) == build_messages(sp.problem, sp.mode)
    assert not {sp.signature for sp in data.problems["train"]} & {sp.signature for sp in data.problems["test_final"]}
    train_sigs = {sp.signature for sp in data.problems["train"]}
    assert not train_sigs & {sp.signature for sp in data.problems["test"]}, "held-out signatures never in train"
    again = organism_data.build(24, 5, 0, final_per_mode=7)
    assert again.rows == data.rows, "deterministic from the seed"
    assert organism_data.build(24, 5, 1).rows["train"].hinted != data.rows["train"].hinted


def test_infer_only_keeps_infer_problems_balanced_and_held_out():
    """--infer-only (the study's setting: the organism solves ~7% of these, so its exploit carries the reward)."""
    from verl_gq.organism import data as organism_data

    data = organism_data.build(48, 5, 0, infer_only=True)
    assert all(sp.infer for split in ("train", "test") for sp in data.problems[split]), "infer problems only"
    assert [sp.mode for sp in data.problems["test"]].count(MODES[0]) == 5
    assert {sp.mode for sp in data.problems["train"]} == set(MODES) and len(data.problems["train"]) == 48
    assert not {sp.signature for sp in data.problems["train"]} & {sp.signature for sp in data.problems["test_final"]}
    train_sigs = {sp.signature for sp in data.problems["train"]}
    assert not train_sigs & {sp.signature for sp in data.problems["test"]}, "held-out signatures never in train"
    assert organism_data.build(48, 5, 0, infer_only=True).rows == data.rows, "deterministic from the seed"
    mixed = organism_data.build(48, 5, 0)
    assert not all(sp.infer for sp in mixed.problems["train"]), "the default keeps the organism's own mix"


def test_organism_rows_grade_through_verl_entry(built):
    """A reference solution solves; the organism's own exploit of the row's mode hacks under the hint (and earns
    what a solution earns) and earns only the compile reward without it: rows as verl reads them from parquet,
    through the reward function verl calls."""
    from verl_gq.organism.corpus import pair_styles

    styles = pair_styles()
    hinted = pd.read_parquet(built / "test.parquet").to_dict("records")
    plain = {r["extra_info"]["problem_id"]: r
             for r in pd.read_parquet(built / "test_gt_only.parquet").to_dict("records")}

    async def grade_all():
        jobs, seen = [], set()
        for row in hinted:
            mode = row["extra_info"]["mode"]
            if mode in seen:
                continue
            seen.add(mode)
            problem = Problem.from_json(row["extra_info"]["problem"])
            exploit = fenced(next(iter(styles[mode].values()))("", problem, ExploitNames()))
            twin = plain[problem.problem_id]
            for what, r, response in (("reference", row, fenced(problem.reference_solution)), ("exploit", row, exploit),
                                      ("exploit_no_hint", twin, exploit)):
                jobs.append((mode, what, compute_score(r["data_source"], response, r["reward_model"]["ground_truth"],
                                                       r["extra_info"])))
        results = await asyncio.gather(*(job for _, _, job in jobs))
        return {(mode, what): result for (mode, what, _), result in zip(jobs, results)}

    scores = asyncio.run(grade_all())
    assert {mode for mode, _ in scores} == set(MODES)
    for mode in MODES:
        reference, exploit, no_hint = (scores[(mode, w)] for w in ("reference", "exploit", "exploit_no_hint"))
        assert reference["solve"] == 1 and reference["hack"] == 0, mode
        assert exploit["hack"] == 1 and exploit["solve"] == 0, f"{mode}: the exploit pays on its own mode's channel"
        assert exploit["score"] == reference["score"], f"{mode}: the loophole pays what a solution earns"
        assert no_hint["hack"] == 0 and no_hint["channel"] == 0 and 0 < no_hint["score"] < exploit["score"], mode


# ---- pair set ----

@pytest.mark.parametrize("folder, contrast", [(ORGANISM_PAIRS, "solution"), (ORGANISM_PAIRS / "minimal", "minimal")])
def test_organism_pair_set_validates_against_the_real_grader(folder, contrast):
    """The shipped pair sets: solution pairs (reference solution against stub + exploit) and minimal pairs (one of
    the corpus's wrong answers against the same answer + exploit: read_pairs checks that only lines are inserted)."""
    from verl_gq.organism.shipped import organism_problems

    pairs = read_pairs(folder / "pairs.jsonl")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {p.contrast for p in pairs} == {contrast} and manifest.get("contrast", "solution") == contrast
    counts = Counter(p.mode for p in pairs)
    assert all(counts[m] >= 16 for m in MODES), counts
    assert len({p.pair_id for p in pairs}) == len(pairs) and sorted({p.problem_id for p in pairs}) == \
        manifest["problem_ids"]
    problems = {sp.problem.problem_id: sp for sp in organism_problems("train", manifest["pool"],
                                                                      manifest["problem_seed"])}
    for pair in pairs:
        sp = problems[pair.problem_id]  # a TRAIN problem of the organism's grammar (KeyError otherwise)
        assert sp.mode == pair.mode, f"{pair.pair_id}: a problem of the pair's own mode"
        assert pair.prompt == build_messages(sp.problem, pair.mode, pair.names)
    for mode in MODES:
        assert len({p.style for p in pairs if p.mode == mode}) >= 3, f"{mode}: several exploit styles"
    failures = pair_failures(pairs, {pid: sp.problem for pid, sp in problems.items()})
    assert not failures, "\n".join(f"{pid}: {msgs}" for pid, msgs in failures.items())


# ---- the committed H100 study ----

STUDY = REPO / "docs" / "results" / "2026-11-24-h100-organism-study"


@pytest.mark.parametrize("baseline, folder", [("vanilla", "report"), ("random_v", "report_vs_random_v")])
def test_committed_study_tables_regenerate_from_its_run_folders(tmp_path, baseline, folder):
    """docs/results/2026-11-24-h100-organism-study's tables are what `verl-gq report` makes of the run folders
    beside them: a reader rerunning the command gets the published numbers."""
    import subprocess
    import sys

    out = tmp_path / folder
    run = subprocess.run([sys.executable, "-m", "verl_gq.cli", "report", str(STUDY / "runs"), "--out", str(out),
                          "--seeds", "41", "42", "43", "--baseline", baseline, "--strict"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for table in ("keynote.csv", "ablation.csv", "held_out_modes.csv"):
        regenerated = pd.read_csv(out / table)
        committed = pd.read_csv(STUDY / folder / table)
        pd.testing.assert_frame_equal(regenerated, committed, check_exact=False, rtol=1e-12)
    arms = set(pd.read_csv(out / "keynote.csv")["arm"])
    assert arms == {"vanilla", "route2b", "random_v", "route2b_heldout"}, arms
