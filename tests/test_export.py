"""`verl-gq export` (verl_gq/export.py) on saved runs of the tiny Qwen3 (CPU): the hf folder, loaded by plain
transformers, and the PEFT adapter, loaded by peft on the base, give the logits of the adapter's own view (each
router's deployed model, the model as trained); the hf folder is the base architecture in the base's dtype with its
config, generation config and tokenizer; a base model the knobs were not trained on, and every other bad request, is
refused with an error naming the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from verl_gq.adapter import QuarantineAdapterConfig, inject_quarantine_adapter
from verl_gq.eval.deploy import load_model_with_knobs
from verl_gq.eval.artifacts.run_dir import RunDir
from verl_gq.cli import main as cli_main
from verl_gq.export import PROVENANCE_FILE, ExportError, export_run
from verl_gq.models import build_qwen_model

# float32: the merged weight W + U_r diag(d) V_r^T and the adapter's factored forward differ only by rounding (seen:
# at most 1.4e-6 on logits of magnitude ~1); the views of these knobs differ by 0.3 or more.
TOLERANCE = 1e-4
# A view's logits must be this far from every other view's for "equal to the view" to mean anything.
VIEWS_APART = 1000 * TOLERANCE
ROUTERS = ["route2b", "random_v"]

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_run(folder: Path, model_dir: Path, quarantines: list[str], rank=8, target_modules=None,
              model_path: Optional[str] = None) -> Path:
    """A run folder whose train.safetensors holds random non-zero effective and quarantine knobs of an adapter on
    `model_dir`; its resolved config names `model_path` (default `model_dir`) as the base model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = QuarantineAdapterConfig(rank=rank, quarantines=quarantines,
                                     **({"target_modules": target_modules} if target_modules else {}))
    adapter = inject_quarantine_adapter(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.knobs.copy_(0.3 * torch.randn(layer.knobs.shape, generator=generator))
    run = folder / "runs" / "study_s41"
    run.mkdir(parents=True)
    resolved = {"actor_rollout_ref": {"model": {"path": model_path or str(model_dir)}}}
    adapter.save(run / "train.safetensors", metadata={"resolved_config": json.dumps(resolved),
                                                      "routers": json.dumps(quarantines), "seed": "41", "step": "3"})
    return run


def view_logits(model_dir: Path, run: Path, input_ids: torch.Tensor) -> dict[Optional[str], torch.Tensor]:
    """{view: logits} of the adapter itself on the base model: None as trained, each router deployed."""
    model, _, adapter = load_model_with_knobs(str(model_dir), run / "train.safetensors", "cpu")
    logits = {}
    with torch.no_grad():
        for view in [None, *adapter.quarantine_names]:
            with adapter.viewing(view):
                logits[view] = model(input_ids=input_ids).logits
    return logits


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_is_view(logits: torch.Tensor, views: dict[Optional[str], torch.Tensor], view: Optional[str]) -> None:
    difference = (logits - views[view]).abs().max().item()
    assert difference <= TOLERANCE, f"the export should give the logits of view {view} (max |diff| {difference:.2e})"
    for other, other_logits in views.items():
        if other != view:
            apart = (views[view] - other_logits).abs().max().item()
            assert apart > VIEWS_APART, f"views {view} and {other} should differ for the check to mean anything"


def export(run: Path, out: Path, *arguments: str) -> int:
    """The `verl-gq export` command, in this process."""
    return cli_main(["export", str(run), "--out", str(out), *arguments])


@pytest.fixture(scope="module")
def two_router_run(tmp_path_factory, tiny_model_dir) -> Path:
    return saved_run(tmp_path_factory.mktemp("two_routers"), tiny_model_dir, ROUTERS)


@pytest.fixture(scope="module")
def input_ids(tiny_model_dir) -> torch.Tensor:
    vocabulary = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    return torch.randint(0, vocabulary, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def two_router_views(two_router_run, tiny_model_dir, input_ids) -> dict[Optional[str], torch.Tensor]:
    return view_logits(tiny_model_dir, two_router_run, input_ids)


@pytest.mark.parametrize("view", ["route2b", "random_v", None], ids=["route2b", "random_v", "as_trained"])
def test_hf_export_gives_the_logits_of_the_adapters_view(two_router_run, two_router_views, input_ids, tmp_path, view):
    out = tmp_path / "hf"
    assert export(two_router_run, out, "--format", "hf", *(["--router", view] if view else ["--as-trained"])) == 0
    assert_is_view(logits_of(AutoModelForCausalLM.from_pretrained(out), input_ids), two_router_views, view)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["view"] == (view or "as_trained") and record["routers"] == ROUTERS
    assert (record["run"], record["step"], record["seed"], record["format"]) == ("study_s41", 3, 41, "hf")
    assert record["train_content_sha256"] == RunDir(two_router_run).train_content_sha256()


def test_hf_export_is_the_base_architecture_with_the_bases_config_and_tokenizer(two_router_run, tiny_model_dir,
                                                                              tmp_path):
    """Exactly the base checkpoint's tensor names, shapes and dtypes (no bases or knobs: a plain model any loader
    serves), the untouched tensors bit for bit, and the base's config.json, generation config and tokenizer."""
    out = tmp_path / "hf"
    assert export(two_router_run, out, "--format", "hf", "--router", "route2b") == 0

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    exported, base = tensors(out), tensors(tiny_model_dir)
    assert sorted(exported) == sorted(base), "the export should hold the base checkpoint's tensors and no others"
    for name, tensor in base.items():
        assert (exported[name].shape, exported[name].dtype) == (tensor.shape, tensor.dtype), name
        adapted = name.endswith("_proj.weight")
        assert torch.equal(exported[name], tensor) != adapted, \
            f"{name}: adapted weights should be merged, every other tensor the base's own"
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())
    assert GenerationConfig.from_pretrained(out).to_dict() == GenerationConfig.from_pretrained(tiny_model_dir).to_dict()
    tokenizer, base_tokenizer = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "def solve(nums): return sum(nums)"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        base_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer("class Solution: pass")["input_ids"] == base_tokenizer("class Solution: pass")["input_ids"]


@pytest.mark.parametrize("view", ["route2b", "random_v", None], ids=["route2b", "random_v", "as_trained"])
def test_peft_export_gives_the_logits_of_the_adapters_view(two_router_run, two_router_views, tiny_model_dir,
                                                           input_ids, tmp_path, view):
    out = tmp_path / "peft"
    assert export(two_router_run, out, "--format", "peft", *(["--router", view] if view else ["--as-trained"])) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert_is_view(logits_of(model, input_ids), two_router_views, view)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["use_rslora"], "rank 8 at scaling 1"
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert json.loads((out / PROVENANCE_FILE).read_text())["view"] == (view or "as_trained")


def test_peft_export_of_a_full_rank_run_gives_each_module_its_rank(tmp_path, tiny_model_dir, input_ids):
    """Rank "full": k_proj and v_proj (32 x 64) have rank 32, the other projections 64; the adapter gives each module
    its rank through rank_pattern, at scaling 1 through alpha_pattern. The run's one router is the default view."""
    run = saved_run(tmp_path, tiny_model_dir, ["route2b"], rank="full")
    out = tmp_path / "peft"
    assert export(run, out, "--format", "peft") == 0
    assert json.loads((out / PROVENANCE_FILE).read_text())["view"] == "route2b", "one router: its deployed model"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert_is_view(logits_of(model, input_ids), view_logits(tiny_model_dir, run, input_ids), "route2b")
    with safe_open(out / "adapter_model.safetensors", framework="pt") as handle:
        ranks = {key: handle.get_slice(key).get_shape()[0] for key in handle.keys() if "lora_A" in key}
    assert {rank for key, rank in ranks.items() if "k_proj" in key or "v_proj" in key} == {32}
    assert {rank for key, rank in ranks.items() if not ("k_proj" in key or "v_proj" in key)} == {64}


def test_bf16_base_is_merged_in_float32_and_saved_in_bf16(tmp_path, tiny_model_dir):
    """The export of a bf16 base is bf16 throughout, and each adapted weight is the float32 merge rounded once to
    bf16, bit for bit (what the trainer's float32 actor hands the rollout engine)."""
    base_dir = tmp_path / "bf16_base"
    build_qwen_model(AutoTokenizer.from_pretrained(tiny_model_dir), family="qwen3", hidden=64, layers=2, heads=4,
                     kv_heads=2, intermediate=128, seed=0, dtype="bfloat16", out_dir=base_dir)
    run = saved_run(tmp_path, base_dir, ROUTERS)
    out = tmp_path / "hf"
    assert export(run, out, "--format", "hf", "--router", "random_v") == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, adapter = load_model_with_knobs(str(base_dir), run / "train.safetensors", "cpu")  # float32
    column = adapter.view_column("random_v")
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
        for name, layer in adapter.layers.items():
            expected = layer.merged_weight(column).to(torch.bfloat16)
            assert torch.equal(handle.get_tensor(f"{name}.weight"), expected), \
                f"{name}: the export should be the float32 merge rounded once to bf16"


def test_a_run_of_another_base_model_is_refused(tmp_path, tiny_model_dir, capsys):
    """Knobs trained on one base mean nothing on another of the same shapes: the export names the module whose basis
    fingerprint differs, and writes nothing."""
    other_dir = tmp_path / "other_base"
    build_qwen_model(AutoTokenizer.from_pretrained(tiny_model_dir), family="qwen3", hidden=64, layers=2, heads=4,
                     kv_heads=2, intermediate=128, seed=1, out_dir=other_dir)
    run = saved_run(tmp_path, other_dir, ROUTERS)
    for fmt in ("hf", "peft"):
        out = tmp_path / fmt
        assert export(run, out, "--format", fmt, "--router", "route2b", "--model", str(tiny_model_dir)) == 1
        error = capsys.readouterr().err
        assert f"{tiny_model_dir} is not the base model run study_s41 was trained on" in error
        assert "basis fingerprint of model.layers.0.self_attn.q_proj does not match this model" in error
        assert not out.exists()
    assert export(run, tmp_path / "own", "--format", "hf", "--router", "route2b") == 0, "its own base exports"


def test_router_choice(two_router_run, tmp_path, tiny_model_dir, input_ids, capsys):
    """Several routers: --router is required and must name one; a run without routers (vanilla) exports the model
    as trained and says so; --router and --as-trained exclude each other."""
    assert export(two_router_run, tmp_path / "a", "--format", "hf") == 1
    assert "the run has routers ['route2b', 'random_v']: pass --router NAME" in capsys.readouterr().err
    assert export(two_router_run, tmp_path / "a", "--format", "hf", "--router", "route3") == 1
    assert "--router route3: the run has no such router; its routers are ['route2b', 'random_v']" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        export(two_router_run, tmp_path / "a", "--format", "hf", "--router", "route2b", "--as-trained")
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    vanilla = saved_run(tmp_path / "vanilla", tiny_model_dir, [])
    assert export(vanilla, tmp_path / "v", "--format", "hf") == 0
    assert "the model as trained (the run has no routers: vanilla)" in capsys.readouterr().out
    assert json.loads((tmp_path / "v" / PROVENANCE_FILE).read_text())["view"] == "as_trained"
    assert_is_view(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "v"), input_ids),
                   view_logits(tiny_model_dir, vanilla, input_ids), None)
    assert export(vanilla, tmp_path / "v2", "--format", "hf", "--router", "route2b") == 1
    assert "--router route2b: the run has no routers (vanilla)" in capsys.readouterr().err


def test_bad_requests_are_refused(two_router_run, tmp_path, tiny_model_dir, capsys):
    def refused(run: Path, out: Path, *arguments: str) -> str:
        assert export(run, out, *arguments) == 1
        return capsys.readouterr().err

    hf = ("--format", "hf", "--router", "route2b")
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} is not a run folder: it has no train.safetensors" in \
        refused(tmp_path / "empty", tmp_path / "o", *hf)
    assert f"{tmp_path / 'missing'}: no such folder" in refused(tmp_path / "missing", tmp_path / "o", *hf)
    with pytest.raises(SystemExit):
        export(two_router_run, tmp_path / "o", "--format", "onnx")
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"format 'onnx': must be one of \['hf', 'peft'\]"):
        export_run(two_router_run, tmp_path / "o", "onnx")

    assert f"--model {tmp_path / 'empty'} is not a local model folder" in \
        refused(two_router_run, tmp_path / "o", *hf, "--model", str(tmp_path / "empty"))
    hub_named = saved_run(tmp_path / "hub", tiny_model_dir, ROUTERS, model_path="Qwen/Qwen3-4B")
    error = refused(hub_named, tmp_path / "o", *hf)
    assert "the run's base model (actor_rollout_ref.model.path = 'Qwen/Qwen3-4B') is not a local model folder" in error
    assert "pass --model PATH" in error

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    assert "exists and is not empty; choose another folder, or pass --force" in refused(two_router_run, occupied, *hf)
    assert (occupied / "notes.txt").read_text() == "keep me"
    assert export(two_router_run, occupied, *hf, "--force") == 0
    assert not (occupied / "notes.txt").exists() and (occupied / "model.safetensors").exists(), "--force replaces"
    assert "which the export reads" in refused(two_router_run, two_router_run.parent, *hf, "--force")
    assert (two_router_run / "train.safetensors").exists()


def test_hf_refuses_an_adapted_weight_tied_to_the_embeddings(tmp_path, tiny_model_dir, capsys):
    """The tiny Qwen3 ties lm_head to the embeddings: one merged tensor cannot be both, so hf refuses (and leaves no
    partial folder) where peft, which keeps the base weights, can export."""
    run = saved_run(tmp_path, tiny_model_dir, ["route2b"], target_modules=["lm_head"])
    out = tmp_path / "exports" / "hf"
    assert export(run, out, "--format", "hf") == 1
    assert "adapted modules ['lm_head'] share their weight with ['model.embed_tokens.weight']" in \
        capsys.readouterr().err
    assert list((tmp_path / "exports").iterdir()) == [], "a failed export leaves nothing behind"
