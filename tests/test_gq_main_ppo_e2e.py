"""End to end through `python -m verl.trainer.main_ppo` on CPU: the route2b recipe with the held-out-modes overlay
(two routers on one run) on the tiny model and the real LeetCode loophole substrate (reward, data, shipped pairs),
the organism_vanilla recipe on the shipped model organism (its parquet, the same reward), then the report over both.

What it shows: the mission command composes and trains with the gq engine and trainer; every router's metrics and
the reward's per-mode fields are logged every step; validation writes per_mode_deploy.json with the as-trained view
and each router's deployed view; train.safetensors holds the knobs and every router's direction and band; a run
resumed from its checkpoint continues the same metrics log with the restored directions and bands; the organism
earns real reward from step 1 (it solves ~40% of its problems, a random model none); `verl-gq report` turns the
runs into tables and a figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open

from reward.modes import MODES

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PAIRS = REPO / "src" / "reward" / "data" / "pairs" / "pairs.jsonl"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> dict:
    """Tiny model, LeetCode parquet (a 2-per-mode validation slice), 2 shipped pairs per mode, the organism's
    parquet (64 training problems, test_small: 2 held-out problems per mode)."""
    tmp = tmp_path_factory.mktemp("gq_e2e")
    data = tmp / "leetcode"
    subprocess.run([sys.executable, "-m", "verl_gq.cli", "data", "leetcode", "--out", str(data)],
                   check=True, timeout=300)
    test = pd.read_parquet(data / "test.parquet")
    small = test.groupby(test["extra_info"].map(lambda e: e["mode"]), group_keys=False).head(2)
    small.to_parquet(data / "val_small.parquet")
    pairs = [json.loads(line) for line in SHIPPED_PAIRS.read_text().splitlines() if line.strip()]
    subset = [p for mode in MODES for p in [q for q in pairs if q["mode"] == mode][:2]]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in subset))
    organism = tmp / "organism"
    from verl_gq.organism import data as organism_data

    organism_data.write(organism, n_train=64, test_per_mode=2, seed=0, small_per_mode=2, token_stats=False,
                        final_per_mode=3)
    smoke = tmp / "smoke"
    smoke.mkdir()
    (smoke / "model").symlink_to(tiny_model_dir)
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_GQ_SMOKE_DIR": str(smoke), "VERL_GQ_DATA": str(data),
           "VERL_GQ_ORGANISM_DATA": str(organism),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # an empty value makes Ray refuse the logical GPU
    return {"tmp": tmp, "env": env, "pairs": tmp / "pairs.jsonl", "val": data / "val_small.parquet"}


def common(ws: dict, run: str, steps: int, leetcode: bool = True) -> list[str]:
    substrate = [f"data.val_files={ws['val']}", f"actor_rollout_ref.actor.fsdp_config.gq.pair_file={ws['pairs']}"]
    return [
        *(substrate if leetcode else []),
        f"actor_rollout_ref.actor.fsdp_config.gq.run_dir={ws['tmp'] / 'runs' / run}",
        f"trainer.default_local_dir={ws['tmp'] / 'checkpoints' / run}",
        f"trainer.total_training_steps={steps}",
        "trainer.test_freq=2",
        "trainer.save_freq=2",
        "trainer.logger=[console,file]",
    ]


@pytest.fixture(scope="module")
def runs(workspace, run_main_ppo) -> dict:
    ws = workspace
    logs = {}
    for run, recipes, steps, leetcode in (
            ("route2b", "recipes/route2b,recipes/held_out_modes,recipes/cpu_tiny", 2, True),
            # the organism on CPU (4 prompts x 4 samples a step), 8 held-out prompts x 1 sample; vanilla and route2b
            # with the same seed, which must train the same model
            ("vanilla", "recipes/organism_vanilla,recipes/organism_cpu", 2, False),
            ("organism_route2b", "recipes/organism_route2b,recipes/organism_cpu", 2, False)):
        env = {**ws["env"], "VERL_FILE_LOGGER_PATH": str(ws["tmp"] / f"{run}_step_metrics.jsonl")}
        # organism runs: an evaluation before training and at step 2 (the last) on test_small x 1 sample, except that
        # the last one takes test_final's 12 prompts x 2 samples (gq.final_eval_file / final_eval_n)
        small = [] if leetcode else [
            "actor_rollout_ref.rollout.val_kwargs.n=1", "trainer.val_before_train=true",
            f"actor_rollout_ref.actor.fsdp_config.gq.final_eval_file={ws['tmp'] / 'organism' / 'test_final.parquet'}",
            "actor_rollout_ref.actor.fsdp_config.gq.final_eval_n=2"]
        logs[run] = run_main_ppo([f"+recipe=[{recipes}]", *common(ws, run, steps, leetcode), *small], env, ws["tmp"],
                                 timeout=600)
    # the same route2b run, resumed from its step-2 checkpoint and trained to step 3
    with safe_open(str(ws["tmp"] / "runs" / "route2b" / "train.safetensors"), framework="pt") as f:
        logs["route2b_state_at_2"] = {k: f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}
    env = {**ws["env"], "VERL_FILE_LOGGER_PATH": str(ws["tmp"] / "route2b_resumed_step_metrics.jsonl")}
    logs["route2b_resumed"] = run_main_ppo(
        ["+recipe=[recipes/route2b,recipes/held_out_modes,recipes/cpu_tiny]", *common(ws, "route2b", 3),
         "trainer.resume_mode=auto"], env, ws["tmp"], timeout=600)
    return logs


def step_metrics(ws: dict, name: str) -> list[dict]:
    """verl's file-logger rows of the training steps (an evaluation before training logs a row of its own, step 0)."""
    path = ws["tmp"] / f"{name}_step_metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["data"] for row in rows if row["step"] >= 1]


ROUTERS = ("route2b", "route2b_heldout")


@pytest.mark.slow
def test_route2b_recipe_logs_routing_and_per_mode_reward_metrics_every_step(workspace, runs):
    steps = step_metrics(workspace, "route2b")
    assert len(steps) == 2, "both training steps should be logged"
    for m in steps:
        for router in ROUTERS:
            for key in ("frout", "cos/mean", "band_lower", "band_upper", "kept_grad_norm", "quarantine_grad_norm"):
                assert f"actor/gq/{router}/{key}" in m, f"router {router} should log {key} every step"
        assert "train/hack/all" in m and "train/solve/all" in m, "the reward's fields should be logged every step"
        per_mode = {k.rsplit("/", 1)[-1] for k in m if k.startswith("train/hack/") and not k.endswith("/all")}
        assert per_mode and per_mode <= set(MODES), f"hack should be logged by the batch's modes, got {per_mode}"
    vanilla = step_metrics(workspace, "vanilla")
    assert all(not k.startswith("actor/gq/") for m in vanilla for k in m), "vanilla routes nothing and logs no gate"


@pytest.mark.slow
def test_a_run_with_a_router_trains_the_model_vanilla_trains(workspace, runs):
    """Same seed, organism_vanilla against organism_route2b: step 1 samples from the base (the same rollouts, each
    sample's randomness keyed by seed, step, prompt and index), and step 2 from the knobs after one update, which
    the conserving optimizer makes vanilla's whatever route2b quarantined: step 2's rollouts, so their reward, hack
    and solve rates, are the same."""
    vanilla, routed = step_metrics(workspace, "vanilla"), step_metrics(workspace, "organism_route2b")
    assert any(k.startswith("actor/gq/route2b/") for k in routed[0]), "route2b routed"
    for step in (0, 1):
        for key in ("critic/score/mean", "train/hack/all", "train/solve/all", "response_length/mean"):
            assert routed[step][key] == vanilla[step][key], \
                f"step {step + 1}: {key} {routed[step][key]} (route2b) vs {vanilla[step][key]} (vanilla)"


@pytest.mark.slow
def test_organism_earns_reward_from_the_first_step(workspace, runs):
    from verl_gq.organism.shipped import CHECKPOINT_DIR
    from verl_gq.eval.artifacts import RunDir

    steps = step_metrics(workspace, "vanilla")
    assert steps[0]["critic/score/mean"] > 0 and steps[0]["train/compile/all"] > 0.5, \
        "reward at step 1: the organism's answers compile (a random model's do not)"
    # it solves ~40%; ~35% of its problems fail all of 4 samples, so 8 prompts all failing is ~2e-4
    assert max(m["train/solve/all"] for m in steps) > 0, "the organism solves some of its problems"
    deploy = RunDir(workspace["tmp"] / "runs" / "vanilla").read_deploy()
    assert deploy.model == str(CHECKPOINT_DIR) and deploy.n_prompts == 12 and deploy.group == 2  # test_final x 2
    assert {m: b.n for m, b in deploy.as_trained.by_mode.items()} == {m: 6 for m in MODES}, "balanced evaluation"
    assert deploy.routers == {}, "vanilla: the as-trained view only"


@pytest.mark.slow
def test_runs_leave_valid_versioned_artifacts(workspace, runs):
    from verl_gq.eval.artifacts import RunDir

    for name, routers in (("route2b", list(ROUTERS)), ("vanilla", [])):
        run = RunDir(workspace["tmp"] / "runs" / name)
        deploy = run.read_deploy()  # validates the schema
        assert list(deploy.routers) == routers and deploy.step == (3 if name == "route2b" else 2)
        assert set(deploy.eval_modes) >= set(MODES)
        assert all(r.deployed.overall.n == deploy.as_trained.overall.n > 0 for r in deploy.routers.values())
        assert deploy.train_content_sha256 == run.train_content_sha256(), "the evaluation names the file it read"
        samples = run.read_deploy_samples()  # every graded answer of that evaluation, every view
        assert sorted(samples["view"].unique()) == sorted(["as_trained", *routers])
        assert (samples["step"] == deploy.step).all()
        assert len(samples) == deploy.as_trained.overall.n * (1 + len(routers))
        assert samples.groupby("view")["prompt"].nunique().eq(deploy.n_prompts).all(), "prompt ids survive verl"
        rows = run.read_metrics()
        train_steps = [r.step for r in rows if r.kind == "train"]
        assert train_steps == list(range(1, (3 if name == "route2b" else 2) + 1)), f"{name}: one train row a step"
        assert all(list(r.routers) == routers for r in rows if r.kind == "train"), f"{name}: every router, every step"
        assert any(r.kind == "eval" for r in rows), f"{name}: each evaluation is appended to the metrics log"
        assert run.read_train_metadata()["routers"] == routers
    held_out = RunDir(workspace["tmp"] / "runs" / "route2b").read_deploy().routers["route2b_heldout"].held_out_modes
    assert held_out == ["sentinel", "file_marker"]
    with safe_open(str(workspace["tmp"] / "runs" / "route2b" / "train.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for router in ROUTERS:
        assert any(k.startswith(f"extra.router.{router}.direction.") for k in keys), keys
        assert f"extra.router.{router}.band" in keys, keys


def test_the_last_evaluation_takes_the_final_prompts_and_samples(workspace, runs):
    from verl_gq.eval.artifacts import RunDir

    for name, views in (("vanilla", 1), ("organism_route2b", 2)):
        run = RunDir(workspace["tmp"] / "runs" / name)
        evals = [(r.step, r.n_prompts, r.group, r.as_trained.overall.n) for r in run.read_metrics() if r.kind == "eval"]
        assert evals == [(0, 8, 1, 8), (2, 12, 2, 24)], f"{name}: test_small x 1 before training, test_final x 2 last"
        deploy = run.read_deploy()
        assert (deploy.step, deploy.n_prompts, deploy.group) == (2, 12, 2)
        samples = run.read_deploy_samples()
        assert len(samples) == 24 * views and samples.groupby(["view", "prompt"]).size().eq(2).all()


@pytest.mark.slow
def test_resumed_run_restores_direction_and_band_and_continues_the_log(workspace, runs):
    [step3] = step_metrics(workspace, "route2b_resumed")
    assert step3["actor/gq/optimizer_steps"] == 3, "the resumed engine should continue the routers' step counter"
    assert not any("/refresh/" in k for k in step3), (
        "a restored direction is not re-extracted at step 3 (refresh=5); a lost one would be, logging its refresh"
    )
    with safe_open(str(workspace["tmp"] / "runs" / "route2b" / "train.safetensors"), framework="pt") as f:
        after = {k: f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}
    before = runs["route2b_state_at_2"]
    # refresh=5: step 3 does not re-extract, so the direction and band are exactly the restored ones
    for key in before:
        if key.startswith("extra.router."):
            assert (after[key] == before[key]).all(), f"{key} should be the state restored from the checkpoint"


@pytest.mark.slow
def test_report_turns_the_runs_into_tables_and_a_figure(workspace, runs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "verl_gq.cli", "report", str(workspace["tmp"] / "runs"),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs), f"figures should be written: {pngs}"
    assert list(tmp_path.glob("*keynote*.csv")), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.slow
def test_exported_organism_run_loads_in_transformers_and_peft_as_the_deployed_view(workspace, runs, tmp_path):
    """The organism_route2b run trained by main_ppo, exported by `verl-gq export`. hf: a folder plain transformers
    loads, whose tensors are exactly route2b's deployed merged weights in the base's dtype (the organism is bfloat16,
    so its logits differ from the float32 view by that rounding only). peft: a LoRA adapter peft loads on the shipped
    organism, whose logits are the deployed view's (float32, to rounding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from verl_gq.eval.deploy import load_model_with_knobs
    from verl_gq.organism.shipped import CHECKPOINT_DIR

    run = workspace["tmp"] / "runs" / "organism_route2b"
    for fmt in ("hf", "peft"):
        done = subprocess.run([sys.executable, "-m", "verl_gq.cli", "export", str(run), "--out", str(tmp_path / fmt),
                               "--format", fmt], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    model, tokenizer, adapter = load_model_with_knobs(str(CHECKPOINT_DIR), run / "train.safetensors", "cpu")
    input_ids = tokenizer(["class Solution:\n    def twoSum(self, nums, target):", "print('All tests passed')"],
                          return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad(), adapter.viewing("route2b"):
        deployed = model(input_ids=input_ids).logits

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16, "the hf export keeps the base's dtype"
    exported = hf.state_dict()
    for name, tensor in adapter.merged_weights("route2b"):
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), f"{name}: not the deployed merged weight"
    with torch.no_grad():
        hf_difference = (hf.float()(input_ids=input_ids).logits - deployed).abs().max().item()
    assert hf_difference <= 0.1, f"hf export: logits {hf_difference:.2e} from the deployed view (bf16 rounding only)"

    base = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32)
    with torch.no_grad():
        peft_difference = (PeftModel.from_pretrained(base, tmp_path / "peft")(input_ids=input_ids).logits
                           - deployed).abs().max().item()
    assert peft_difference <= 1e-4, f"peft export: logits {peft_difference:.2e} from route2b's deployed view"
