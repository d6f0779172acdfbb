"""verl-gq's plugin is loaded by `import verl` in a fresh process, fails loudly, and supplies the `recipe` group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_import_verl_alone_makes_every_registration_visible(tmp_path):
    code = """
import json, verl
from verl.plugin.platform.platform_manager import PlatformRegistry
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
print(json.dumps({
    "platform": PlatformRegistry.get("cpu").__name__,
    "engines": {b: sorted(map(str, EngineRegistry._engines["language_model"][b])) for b in ("fsdp", "fsdp2")},
    "replica": RolloutReplicaRegistry.get("hf").__name__,
    "adapter": get_rollout_class("hf", "async").__name__,
}))
"""
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["platform"] == "PlatformCPU", "platform 'cpu' must be registered by `import verl`"
    assert all("cpu" in devices for devices in seen["engines"].values()), "FSDP engines must exist for device cpu"
    assert seen["replica"] == "HFReplica" and seen["adapter"] == "HFServerAdapter", "the hf rollout must be registered"
    assert "verl-gq: the verl plugin failed" not in result.stderr


BREAK_PLUGIN = 'import sys; sys.modules["verl_gq.verl.gapfill.hf_rollout"] = None  # an import of the plugin fails\n'


def test_a_broken_plugin_prints_its_traceback_on_import_verl(tmp_path):
    code = BREAK_PLUGIN + """
import verl  # verl swallows entry-point errors at DEBUG: the plugin itself must make the failure visible
print("verl imported")
try:
    import verl_gq.verl.plugin
except ImportError:
    print("plugin import raised ImportError")
"""
    result = run_python(code, cwd=tmp_path)
    assert "verl-gq: the verl plugin failed to import" in result.stderr, result.stderr
    assert "Traceback" in result.stderr and "verl_gq.verl.gapfill.hf_rollout" in result.stderr
    assert "verl imported" in result.stdout
    assert "plugin import raised ImportError" in result.stdout, "code reached by path must re-raise the error"


def test_a_broken_plugin_stops_a_recipe_run_before_training(tmp_path):
    code = BREAK_PLUGIN + """
import runpy
sys.argv = ["main_ppo", "+recipe=recipes/smoke_cpu", "--cfg", "job"]
runpy.run_module("verl.trainer.main_ppo", run_name="__main__")
"""
    result = run_python(code, cwd=tmp_path)
    assert result.returncode != 0, "a recipe run with a broken plugin must fail, not train without it"
    assert "verl-gq: the verl plugin failed to import" in result.stderr
    assert "actor_rollout_ref" not in result.stdout, "no config may be produced"


def test_recipe_group_resolves_smoke_recipe_from_any_working_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=recipes/smoke_cpu.yaml", "--cfg", "job"],
        cwd=tmp_path, env={**os.environ, "VERL_GQ_SMOKE_DIR": "/data/smoke"},
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    assert config["actor_rollout_ref"]["rollout"]["name"] == "hf", "the recipe must merge at the root (_global_)"
    assert config["ray_kwargs"]["ray_init"]["num_gpus"] == 1
    assert config["trainer"]["device"] == "cpu"
    assert (REPO / "src/verl_gq/conf/recipe/recipes").resolve() == (REPO / "recipes").resolve(), \
        "the recipe group must read the repository's recipes/ folder"
