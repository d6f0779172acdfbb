"""A gq run that cannot work stops on the driver, before Ray starts, with an error naming the file, line or field.

The checks run where verl validates the actor config in main_ppo (verl/utils/config.py, `validate_config`): the
tests compose each bad run with Hydra exactly as main_ppo does and call verl's own `validate_config` on it; one
bad run goes through `python -m verl.trainer.main_ppo` itself, to show it stops before Ray and how fast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reward.pairs import SHIPPED_PAIRS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pairs")
    lines = SHIPPED_PAIRS.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    files = {
        "sentinal": [json.dumps({**row, "mode": "sentinal"}) for row in rows],
        "malformed": lines[:1] + [lines[1][:200]] + lines[2:],
        "missing_key": lines[:4] + [json.dumps({k: v for k, v in rows[4].items() if k != "hack"})] + lines[5:],
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp / f"{name}.jsonl"
        out[name].write_text("\n".join(content) + "\n")
    return out


def composed(overrides: list[str], smoke_dir: Path):
    from hydra import compose, initialize_config_module

    import verl_gq.verl.plugin  # noqa: F401  (what main_ppo's driver loads through the entry point)

    os.environ["VERL_GQ_SMOKE_DIR"] = str(smoke_dir)
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=["+recipe=[recipes/route2b,recipes/held_out_modes,recipes/cpu_tiny]",
                                                 *overrides])


def validate(overrides: list[str], smoke_dir: Path) -> None:
    """verl's driver-side validation of a composed run (main_ppo does exactly this before ray.init)."""
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    config = composed(overrides, smoke_dir)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory, tiny_model_dir) -> Path:
    smoke = tmp_path_factory.mktemp("smoke")
    (smoke / "model").symlink_to(tiny_model_dir)
    return smoke


GQ = "actor_rollout_ref.actor.fsdp_config.gq"


def test_a_good_run_passes_the_driver_checks(smoke_dir):
    validate([], smoke_dir)


@pytest.mark.parametrize("case, overrides, message", [
    ("every pair of an unknown mode", ["pair_file=sentinal"],
     r"gq.pair_file: .*sentinal.jsonl:1: pair '.*' names mode 'sentinal', known: \['run_tests'"),
    ("a malformed line", ["pair_file=malformed"], r"malformed.jsonl:2: not JSON: Unterminated string"),
    ("a pair missing a key", ["pair_file=missing_key"], r"missing_key.jsonl:5: pair '.*' lacks key\(s\) 'hack'"),
    ("reversed band quantiles", [f"+{GQ}.routers.route2b.clean_quantile=0.1",
                                 f"+{GQ}.routers.route2b.hack_quantile=0.9"],
     r"router 'route2b': clean_quantile=0.1: must be >= hack_quantile=0.9"),
    ("too few pairs for a router's modes", [f"{GQ}.routers.route2b_heldout.direction_modes=[sentinel]",
                                            "pair_file=first_two"],
     r"gq.routers.route2b_heldout: .* has 2 pairs of modes \['sentinel'\]; .* at least 4"),
    ("a rank the model cannot hold", [f"{GQ}.rank=48"],
     r"gq.rank / gq.target_modules on .*: rank=48 exceeds min\(d_out, d_in\)=32 of model.layers.0.self_attn.k_proj"),
    ("a target module the model lacks", [f"+{GQ}.target_modules=[q_proj,qkv_proj]"],
     r"patterns \['qkv_proj'\] match no nn.Linear"),
    ("LoRA on the gq engine", ["actor_rollout_ref.model.lora_rank=8"],
     r"actor_rollout_ref.model.lora_rank=8: the gq engine's SVD adapter takes LoRA's place"),
    ("a pair longer than max_pair_tokens", [f"{GQ}.max_pair_tokens=200"], r"exceed max_pair_tokens=200"),
    ("an unknown router field", [f"+{GQ}.routers.route2b.granularty=token"],
     r"gq.routers.route2b: unknown keys \['granularty'\]"),
    ("a router matching a missing one", [f"+{GQ}.routers.random_v.band=frout_match",
                                         f"+{GQ}.routers.random_v.direction=haar", f"+{GQ}.routers.random_v.match=route3b"],
     r"router 'random_v': match='route3b' names no router"),
    ("a final evaluation file that is not there", [f"{GQ}.final_eval_file=/nonexistent/test_final.parquet"],
     r"gq.final_eval_file='/nonexistent/test_final.parquet': no such file"),
    ("a negative final evaluation size", [f"{GQ}.final_eval_n=-1"], r"gq.final_eval_n=-1: must be an int >= 0"),
])
def test_bad_runs_fail_on_the_driver_naming_what_is_wrong(smoke_dir, pair_files, tmp_path, case, overrides, message):
    import re

    if "pair_file=first_two" in overrides:
        rows = [json.loads(line) for line in SHIPPED_PAIRS.read_text().splitlines()]
        kept = [r for r in rows if r["mode"] != "sentinel"] + [r for r in rows if r["mode"] == "sentinel"][:2]
        (tmp_path / "first_two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resolved = []
    for item in overrides:
        if item.startswith("pair_file="):
            name = item.split("=", 1)[1]
            path = pair_files[name] if name in pair_files else tmp_path / f"{name}.jsonl"
            item = f"{GQ}.pair_file={path}"
        resolved.append(item)
    started = time.perf_counter()
    # a GQConfigError, as raised or as Hydra's InstantiationException around it (what main_ppo prints)
    with pytest.raises(Exception) as error:
        validate(resolved, smoke_dir)
    seconds = time.perf_counter() - started
    print(f"{case}: {seconds:.2f} s: {error.value}")
    assert re.search(message, str(error.value), re.S), f"{case}: {error.value}"


def test_main_ppo_stops_on_a_bad_pair_file_before_ray_starts(smoke_dir, pair_files, tmp_path):
    """The real command: a pair file naming an unknown mode stops main_ppo on the driver, before `ray.init`."""
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_GQ_SMOKE_DIR": str(smoke_dir), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo",
                             "+recipe=[recipes/route2b,recipes/cpu_tiny]", f"{GQ}.pair_file={pair_files['sentinal']}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    print(f"main_ppo failed after {seconds:.1f} s")
    assert result.returncode != 0 and "names mode 'sentinal'" in output, output[-3000:]
    assert "ray init kwargs" not in output and "Started a local Ray instance" not in output, \
        "the run must stop before Ray starts"


def test_a_checkpoint_engine_that_bypasses_the_merged_weights_is_refused(smoke_dir):
    from verl_gq.verl.trainer import check_trainer_config

    config = composed(["actor_rollout_ref.rollout.checkpoint_engine.backend=delta_sharded"], smoke_dir)
    with pytest.raises(ValueError, match="checkpoint_engine.backend='delta_sharded': it ships the actor's sharded"):
        check_trainer_config(config)
    if shutil.which("unshare") is None:  # the sandbox check needs an isolating host, which the CPU suite has
        return
    check_trainer_config(composed([], smoke_dir))


def test_a_monitor_on_another_advantage_is_refused_before_the_workers(smoke_dir):
    from verl_gq.verl.trainer import check_trainer_config

    monitor = [f"{GQ}.routers.route2b=null", f"{GQ}.routers.route2b_heldout=null",
               f"+{GQ}.monitor.kind=gt_labels", f"+{GQ}.monitor.intervention=screening"]
    with pytest.raises(ValueError, match=r"gq.monitor \(screening_gt_labels90\) acts on GRPO's outcome advantage"):
        check_trainer_config(composed([*monitor, "algorithm.adv_estimator=rloo"], smoke_dir))
    with pytest.raises(ValueError, match="algorithm.use_kl_in_reward=false"):
        check_trainer_config(composed([*monitor, "algorithm.use_kl_in_reward=true"], smoke_dir))
