"""The stand-alone deploy evaluation (scripts/deploy_eval.py) on a saved run of the tiny model: real generation,
real sandboxed grading, a schema-valid per_mode_deploy file; and the quarantine view really switched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from verl_gq.adapter.config import QuarantineAdapterConfig
from verl_gq.adapter.layer import KEEP, QUARANTINE
from verl_gq.adapter.model import inject_quarantine_adapter
from verl_gq.eval.deploy import DeploySettings, evaluate
from verl_gq.eval.schema import parse_deploy

REPO = Path(__file__).resolve().parents[1]


def _saved_run(tmp: Path, model_dir: Path, quarantine_scale: float) -> Path:
    """A run folder whose train.safetensors holds random kept knobs and quarantine knobs of `quarantine_scale`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.knobs[KEEP].copy_(0.1 * torch.randn(layer.rank, generator=generator))
            layer.knobs[QUARANTINE].copy_(quarantine_scale * torch.randn(layer.rank, generator=generator))
    run = tmp / "runs" / "route2b_s41"
    run.mkdir(parents=True)
    config = {"actor_rollout_ref": {"model": {"path": str(model_dir)},
                                    "actor": {"fsdp_config": {"gq": {"direction_modes": ["run_tests", "sentinel"]}}}}}
    adapter.save(run / "train.safetensors", metadata={"resolved_config": json.dumps(config), "arm": "route2b",
                                                      "seed": "41", "step": "3"})
    return run


def _eval_file(tmp: Path) -> Path:
    out = tmp / "leetcode"
    subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_leetcode.py"), "build", "--out", str(out)],
                   check=True, timeout=300)
    return out / "test.parquet"


def test_deploy_eval_command_writes_a_valid_per_mode_file(tmp_path, tiny_model_dir):
    run, eval_file = _saved_run(tmp_path, tiny_model_dir, 0.5), _eval_file(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "deploy_eval.py"), str(run), "--eval-file",
                             str(eval_file), "--n-prompts", "4", "--group", "2", "--max-new-tokens", "8",
                             "--randomise-names"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = run / "per_mode_deploy.standalone.json"
    record = parse_deploy(out.read_text(), str(out))
    assert (record.arm, record.seed, record.step, record.n_prompts, record.group) == ("route2b", 41, 3, 4, 2)
    assert record.names_randomised and record.held_out_modes == ["stdout_marker", "file_marker"]
    for block in (record.deployed, record.as_trained):
        assert block.overall.n == 8 and all(block.by_mode[m].n == 2 for m in block.by_mode if block.by_mode[m].n)


def test_record_writes_the_runs_own_evaluation_and_an_eval_row(tmp_path, tiny_model_dir):
    """--record: the evaluation of a run trained without one becomes its per_mode_deploy.json and an eval row at the
    saved step, which is what scripts/report.py reads."""
    from verl_gq.eval.run_dir import RunDir
    from verl_gq.eval.schema import EvalBlock, KnobGradNorms, TrainRow

    def train_row(step: int) -> TrainRow:
        batch = EvalBlock.from_samples(["run_tests"] * 4, [True, False, False, False], [False] * 4, eval_modes=["run_tests"])
        return TrainRow(step=step, time=100.0 + step, reward_mean=1.0, as_trained=batch, frout=0.0, cos=None,
                        band=None, knob_grad_norm=KnobGradNorms(keep=1.0, quarantine=0.0), direction_refreshed=False,
                        extra={})

    run, eval_file = _saved_run(tmp_path, tiny_model_dir, 0.5), _eval_file(tmp_path)
    log = RunDir(run).open_metrics_log()
    for step in (1, 2, 3):
        log.append(train_row(step))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "deploy_eval.py"), str(run), "--eval-file",
                             str(eval_file), "--n-prompts", "4", "--group", "2", "--max-new-tokens", "8", "--record"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = RunDir(run).read_metrics()
    # the log notes that it was reopened at the saved step, then the evaluation
    assert [(r.kind, r.step) for r in rows] == [("train", 1), ("train", 2), ("train", 3), ("resume", 3), ("eval", 3)]
    assert RunDir(run).read_deploy().step == 3 and not (run / "per_mode_deploy.standalone.json").exists()


def test_deployed_view_differs_from_as_trained_only_through_the_quarantine(tmp_path, tiny_model_dir, monkeypatch):
    """With zero quarantine knobs both views sample the same answers; with large ones the answers change."""
    import verl_gq.eval.deploy as deploy

    eval_file = _eval_file(tmp_path)
    settings = DeploySettings(n_prompts=4, group=2, max_new_tokens=8, temperature=0.7)
    seen: list[list[str]] = []
    real = deploy.sample_answers
    monkeypatch.setattr(deploy, "sample_answers", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    evaluate(str(tiny_model_dir), _saved_run(tmp_path / "zero", tiny_model_dir, 0.0) / "train.safetensors",
             eval_file, settings)
    assert seen[0] == seen[1], "zero quarantine knobs: deployed and as-trained samples should be identical"
    seen.clear()
    evaluate(str(tiny_model_dir), _saved_run(tmp_path / "big", tiny_model_dir, 5.0) / "train.safetensors",
             eval_file, settings)
    assert seen[0] != seen[1], "large quarantine knobs: removing them should change what the model samples"


def test_base_view_ignores_the_knobs(tmp_path, tiny_model_dir, monkeypatch):
    """The base view (scripts/deploy_eval.py --base) samples the model the run started from: the same answers
    whatever the run's knobs, and not the answers of the trained model."""
    import verl_gq.eval.deploy as deploy

    eval_file = _eval_file(tmp_path)
    settings = DeploySettings(n_prompts=4, group=2, max_new_tokens=8, temperature=0.7)
    seen: list[list[str]] = []
    real = deploy.sample_answers
    monkeypatch.setattr(deploy, "sample_answers", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    big = _saved_run(tmp_path / "big", tiny_model_dir, 5.0) / "train.safetensors"
    blocks = evaluate(str(tiny_model_dir), big, eval_file, settings, views=deploy.BASE_VIEWS)
    assert list(blocks) == ["base"] and blocks["base"].overall.n == 8
    evaluate(str(tiny_model_dir), _saved_run(tmp_path / "zero", tiny_model_dir, 0.0) / "train.safetensors",
             eval_file, settings, views=deploy.BASE_VIEWS)
    evaluate(str(tiny_model_dir), big, eval_file, settings, views={"as_trained": 1.0})
    assert seen[0] == seen[1], "the base view should not depend on the run's knobs"
    assert seen[0] != seen[2], "the base model should answer differently from the trained one"
