"""The stand-alone deploy evaluation (`verl-gq deploy-eval`) on a saved run of the tiny model: real generation,
real sandboxed grading, a schema-valid per_mode_deploy file with every router's view; and the views really
switched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from verl_gq.adapter.config import QuarantineAdapterConfig
from verl_gq.adapter.model import inject_quarantine_adapter
from verl_gq.eval.deploy import evaluate, view_blocks
from verl_gq.eval.settings import DeploySettings
from verl_gq.eval.artifacts.run_dir import RunDir
from verl_gq.eval.artifacts.samples import check_matches, read_samples
from verl_gq.eval.artifacts.schema import parse_deploy

REPO = Path(__file__).resolve().parents[1]


def _saved_run(tmp: Path, model_dir: Path, quarantine_scale: float) -> Path:
    """A run folder whose train.safetensors holds random effective knobs and, for routers route2b and random_v,
    quarantine knobs of `quarantine_scale`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=8, quarantines=["route2b", "random_v"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.knobs[:, 0].copy_(0.1 * torch.randn(layer.rank, generator=generator))
            layer.knobs[:, 1:].copy_(quarantine_scale * torch.randn(layer.rank, 2, generator=generator))
    run = tmp / "runs" / "study_s41"
    run.mkdir(parents=True)
    routers = {"route2b": {"direction_modes": ["run_tests", "sentinel"]}, "random_v": {"direction": "haar"}}
    config = {"actor_rollout_ref": {"model": {"path": str(model_dir)},
                                    "actor": {"fsdp_config": {"gq": {"routers": routers}}}}}
    adapter.save(run / "train.safetensors", metadata={"resolved_config": json.dumps(config),
                                                      "routers": json.dumps(list(routers)), "seed": "41", "step": "3"})
    return run


def _eval_file(tmp: Path) -> Path:
    out = tmp / "leetcode"
    subprocess.run([sys.executable, "-m", "verl_gq.cli", "data", "leetcode", "--out", str(out)],
                   check=True, timeout=300)
    return out / "test.parquet"


def test_deploy_eval_command_writes_a_valid_per_mode_file(tmp_path, tiny_model_dir):
    run, eval_file = _saved_run(tmp_path, tiny_model_dir, 0.5), _eval_file(tmp_path)
    result = subprocess.run([sys.executable, "-m", "verl_gq.cli", "deploy-eval", str(run), "--eval-file",
                             str(eval_file), "--n-prompts", "4", "--group", "2", "--max-new-tokens", "8",
                             "--randomise-names"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = run / "per_mode_deploy.standalone.json"
    record = parse_deploy(out.read_text(), str(out))
    assert (record.seed, record.step, record.n_prompts, record.group) == (41, 3, 4, 2)
    assert record.names_randomised and list(record.routers) == ["route2b", "random_v"]
    assert record.routers["route2b"].held_out_modes == ["stdout_marker", "file_marker"]
    assert record.routers["random_v"].held_out_modes == []
    assert record.train_content_sha256 == RunDir(run).train_content_sha256(), "the evaluation names the file it read"
    for block in (record.as_trained, *(r.deployed for r in record.routers.values())):
        assert block.overall.n == 8 and all(block.by_mode[m].n == 2 for m in block.by_mode if block.by_mode[m].n)
    samples = read_samples(run / "per_mode_deploy.standalone.samples.parquet")
    blocks = {"as_trained": record.as_trained, **{name: r.deployed for name, r in record.routers.items()}}
    check_matches(samples, blocks, "standalone samples")  # every view's answers count to its rates
    for view, rows in samples.groupby("view"):
        assert rows["prompt"].nunique() == 4 and sorted(rows["sample"]) == [0, 0, 0, 0, 1, 1, 1, 1], view
        assert (rows["step"] == 3).all() and (rows["response_chars"] >= 0).all()
    by_view = {view: rows.sort_values(["prompt", "sample"])["prompt"].tolist() for view, rows in samples.groupby("view")}
    assert len({tuple(p) for p in by_view.values()}) == 1, "every view answers the same prompts"


def test_record_writes_the_runs_own_evaluation_and_an_eval_row(tmp_path, tiny_model_dir):
    """--record: the evaluation of a run trained without one becomes its per_mode_deploy.json and an eval row at the
    saved step, which is what `verl-gq report` reads."""
    from verl_gq.eval.artifacts.schema import EvalBlock, TrainRow

    def train_row(step: int) -> TrainRow:
        batch = EvalBlock.from_samples(["run_tests"] * 4, [True, False, False, False], [False] * 4, eval_modes=["run_tests"])
        return TrainRow(step=step, time=100.0 + step, reward_mean=1.0, as_trained=batch, grad_norm=1.0, routers={})

    run, eval_file = _saved_run(tmp_path, tiny_model_dir, 0.5), _eval_file(tmp_path)
    log = RunDir(run).open_metrics_log()
    for step in (1, 2, 3):
        log.append(train_row(step))
    result = subprocess.run([sys.executable, "-m", "verl_gq.cli", "deploy-eval", str(run), "--eval-file",
                             str(eval_file), "--n-prompts", "4", "--group", "2", "--max-new-tokens", "8", "--record"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = RunDir(run).read_metrics()
    # the log notes that it was reopened at the saved step, then the evaluation
    assert [(r.kind, r.step) for r in rows] == [("train", 1), ("train", 2), ("train", 3), ("resume", 3), ("eval", 3)]
    assert RunDir(run).read_deploy().step == 3 and not (run / "per_mode_deploy.standalone.json").exists()
    samples = RunDir(run).read_deploy_samples()
    assert len(samples) == 3 * 8 and (samples["step"] == 3).all(), "the run's own per-sample outcomes, every view"


def test_deployed_views_differ_from_as_trained_only_through_their_quarantine(tmp_path, tiny_model_dir, monkeypatch):
    """With zero quarantine knobs every view samples the same answers; with large ones each deployed view changes."""
    import verl_gq.eval.deploy as deploy

    eval_file = _eval_file(tmp_path)
    settings = DeploySettings(n_prompts=4, group=2, max_new_tokens=8, temperature=0.7)
    seen: list[list[str]] = []
    real = deploy.sample_answers
    monkeypatch.setattr(deploy, "sample_answers", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    evaluate(str(tiny_model_dir), _saved_run(tmp_path / "zero", tiny_model_dir, 0.0) / "train.safetensors",
             eval_file, settings, step=3)
    assert seen[0] == seen[1] == seen[2], "zero quarantine knobs: every view should sample identically"
    seen.clear()
    evaluate(str(tiny_model_dir), _saved_run(tmp_path / "big", tiny_model_dir, 5.0) / "train.safetensors",
             eval_file, settings, step=3)
    assert seen[0] != seen[1] and seen[0] != seen[2] and seen[1] != seen[2], \
        "large quarantine knobs: removing each should change what the model samples, each its own way"


def test_base_view_ignores_the_knobs(tmp_path, tiny_model_dir, monkeypatch):
    """The base view (`verl-gq deploy-eval --base`) samples the model the run started from: the same answers
    whatever the run's knobs, and not the answers of the trained model."""
    import verl_gq.eval.deploy as deploy

    eval_file = _eval_file(tmp_path)
    settings = DeploySettings(n_prompts=4, group=2, max_new_tokens=8, temperature=0.7)
    seen: list[list[str]] = []
    real = deploy.sample_answers
    monkeypatch.setattr(deploy, "sample_answers", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    big = _saved_run(tmp_path / "big", tiny_model_dir, 5.0) / "train.safetensors"
    blocks = view_blocks(evaluate(str(tiny_model_dir), big, eval_file, settings, step=3, views=[deploy.BASE]))
    assert list(blocks) == ["base"] and blocks["base"].overall.n == 8
    evaluate(str(tiny_model_dir), _saved_run(tmp_path / "zero", tiny_model_dir, 0.0) / "train.safetensors",
             eval_file, settings, step=3, views=[deploy.BASE])
    evaluate(str(tiny_model_dir), big, eval_file, settings, step=3, views=["route2b"])  # a large knob: s - q
    assert seen[0] == seen[1], "the base view should not depend on the run's knobs"
    assert seen[0] != seen[2], "the base model should answer differently from the trained one"
