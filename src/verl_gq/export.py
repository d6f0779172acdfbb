"""Export a run's model for use outside verl-gq: the deployed model (a router's quarantine deleted) or the model as
trained, as a plain Hugging Face folder or as a PEFT LoRA adapter on the base model.

    verl-gq export RUN_DIR --out DIR --format hf|peft [--router NAME | --as-trained] [--model PATH]
                   [--svd-device DEVICE] [--force]

The view: deployed without router NAME's quarantine, each adapted module's diagonal d = s - q_NAME; as trained,
d = s (the quarantines kept). A run with one router exports its deployed model by default; a run with several needs
--router (or --as-trained); a run without routers (vanilla) has only the model as trained.

  hf    every adapted weight W becomes W + U_r diag(d) V_r^T, merged in float32 (float64 for a float64 base) and
        saved in the base model's dtype with save_pretrained (safetensors), with the base's config, generation
        config and tokenizer. The folder holds the base architecture's tensors and nothing else: transformers and
        vLLM load it as they load the base.
  peft  per adapted module a LoRA of the module's rank r: lora_B = U_r, lora_A = diag(d) V_r^T, lora_alpha = r
        (scaling 1), so base + adapter is the same model. Saved with peft's save_pretrained, in float32 (float64
        for a float64 base), on base_model_name_or_path = the base model folder.

Beside either: verl_gq_export.json (run, view, step, seed, the content SHA-256 of train.safetensors, base model).
The base model must be the one the run was trained on: the knobs' basis fingerprints are checked against it.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from verl_gq.adapter import (
    AdapterLoadError,
    QuarantineAdapter,
    SVDQuarantineLinear,
    adapter_config_of,
    inject_quarantine_adapter,
    knob_scale,
)
from verl_gq.eval.artifacts.run_dir import TRAIN_FILE, RunDir, source_commit
from verl_gq.eval.artifacts.schema import SchemaError

FORMATS = ("hf", "peft")
PROVENANCE_FILE = "verl_gq_export.json"
AS_TRAINED = "as_trained"  # the view name written for the model with its quarantines kept


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the argument, file or field at fault."""


def choose_view(routers: list[str], router: Optional[str], as_trained: bool) -> Optional[str]:
    """The view to export: a router's name (its deployed model) or None (the model as trained).

    Without a choice: the one router of a one-router run, the model as trained of a run without routers; a run with
    several routers must be told which."""
    if as_trained:
        if router is not None:
            raise ExportError(f"--router {router} and --as-trained exclude each other: choose one view")
        return None
    if router is not None:
        if not routers:
            raise ExportError(f"--router {router}: the run has no routers (vanilla); its only model is the one as "
                              f"trained (omit --router)")
        if router not in routers:
            raise ExportError(f"--router {router}: the run has no such router; its routers are {routers}")
        return router
    if len(routers) > 1:
        raise ExportError(f"the run has routers {routers}: pass --router NAME for that router's deployed model, or "
                          f"--as-trained for the model with every quarantine kept")
    return routers[0] if routers else None


def base_model_folder(resolved_config: dict, model: Optional[str]) -> Path:
    """--model, or the run's actor_rollout_ref.model.path; either must be a local model folder (with config.json)."""
    if model is None:
        try:
            model = resolved_config["actor_rollout_ref"]["model"]["path"]
        except (KeyError, TypeError):
            raise ExportError("the run's resolved_config has no actor_rollout_ref.model.path; pass --model PATH, "
                              "the base model's folder") from None
        source = f"the run's base model (actor_rollout_ref.model.path = {model!r})"
    else:
        source = f"--model {model}"
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ExportError(f"{source} is not a local model folder (no config.json in it); pass --model PATH, the "
                          f"folder of the base model the run was trained on")
    return folder


def export_run(run_dir: Path | str, out: Path | str, fmt: str, router: Optional[str] = None, as_trained: bool = False,
               model: Optional[str] = None, force: bool = False, svd_device: Optional[str] = None,
               progress: Callable[[str], None] = lambda message: None) -> dict:
    """Write the chosen view of a run to `out` in format `fmt` ("hf" or "peft"); return the provenance record that
    is also written to out/verl_gq_export.json.

    `out` must not exist or be empty, unless `force` (then it is replaced). The folder appears whole or not at all:
    the export is written beside it and moved into place at the end. Errors: ExportError naming the problem (a base
    model the knobs were not trained on included, with the fingerprint check's message)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: must be one of {list(FORMATS)}")
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ExportError(f"{run.path}: no such folder")
    if not run.train_file.is_file():
        raise ExportError(f"{run.path} is not a run folder: it has no {TRAIN_FILE}")
    try:
        metadata = run.read_train_metadata()
        routers = adapter_config_of(run.train_file).quarantines
    except (SchemaError, AdapterLoadError) as error:
        raise ExportError(str(error)) from None
    view = choose_view(routers, router, as_trained)
    base = base_model_folder(metadata["resolved_config"], model)
    out = Path(out)
    _check_out(out, force, keep=[run.path, base])

    described = f"router {view}'s deployed model (its quarantine deleted)" if view else "the model as trained"
    if not routers:
        described += " (the run has no routers: vanilla)"
    progress(f"run {run.name} (step {metadata['step']}, seed {metadata['seed']}): exporting {described}")
    adapter, base_dtype = load_run_adapter(base, run, svd_device)
    progress(f"base model {base} ({_dtype_name(base_dtype)}): the run's knobs fit it")

    record = {
        "format": fmt,
        "run": run.name,
        "run_dir": str(run.path.resolve()),
        "view": view or AS_TRAINED,
        "routers": routers,
        "step": metadata["step"],
        "seed": metadata["seed"],
        "train_content_sha256": run.train_content_sha256(),
        "base_model": str(base.resolve()),
        "dtype": _dtype_name(base_dtype),
        "verl_gq_commit": source_commit(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if fmt == "hf":
            write_hf(adapter, view, base, base_dtype, staging)
        else:
            write_peft(adapter, view, base, staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"wrote {fmt} export to {out}")
    return record


def load_run_adapter(base: Path, run: RunDir,
                     svd_device: Optional[str] = None) -> tuple[QuarantineAdapter, torch.dtype]:
    """The base model with the run's adapter injected and its knobs loaded, and the base checkpoint's dtype.

    The model is loaded in its own dtype, then held in float32 at least: the adapter stores its bases in the
    weight's dtype, and bf16 bases would round U_r and V_r before the merge. It is also the precision the training
    engine merges in (verl's actor holds float32 weights by default, model_dtype fp32) before the rollout engine
    casts the merged weights to its own dtype."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    base_dtype = model.dtype
    model.to(torch.promote_types(base_dtype, torch.float32))
    adapter = inject_quarantine_adapter(model, adapter_config_of(run.train_file), svd_device=svd_device)
    try:
        adapter.load(run.train_file)
    except AdapterLoadError as error:
        raise ExportError(f"{base} is not the base model run {run.name} was trained on: {error}") from None
    return adapter, base_dtype


def write_hf(adapter: QuarantineAdapter, view: Optional[str], base: Path, base_dtype: torch.dtype, out: Path) -> None:
    """The view's merged weights as the base architecture, saved in `base_dtype` with the base's tokenizer."""
    from transformers import AutoTokenizer

    tied = _tied_adapted_weights(adapter)
    if tied:
        shared = sorted(set().union(*tied.values()))
        raise ExportError(f"adapted modules {sorted(tied)} share their weight with {shared} (tied embeddings): one "
                          f"merged tensor cannot be both; use --format peft")
    column = adapter.view_column(view)
    model = _replace_adapted_linears(adapter, lambda layer: layer.merged_weight(column))
    model.to(base_dtype)
    model.save_pretrained(out)  # safetensors, the base's config.json and generation_config.json
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def write_peft(adapter: QuarantineAdapter, view: Optional[str], base: Path, out: Path) -> None:
    """The view's knobs as a PEFT LoRA adapter on the base model: lora_B = U_r, lora_A = diag(d) V_r^T, scaling 1."""
    from peft import get_peft_model

    column = adapter.view_column(view)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in adapter.layers.items():
        work = torch.promote_types(layer.weight.dtype, torch.float32)
        diagonal = knob_scale(layer.knobs.detach(), column).to(work)
        factors[name] = (layer.basis_u.detach().to(work), diagonal[:, None] * layer.basis_v.detach().to(work).T)
    ranks = {name: layer.rank for name, layer in adapter.layers.items()}
    model = _replace_adapted_linears(adapter, lambda layer: layer.weight.detach())  # the base model again
    peft_model = get_peft_model(model, lora_config(ranks, str(base.resolve())))
    with torch.no_grad():
        for name, (lora_b, lora_a) in factors.items():
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(lora_a)
            module.lora_B["default"].weight.copy_(lora_b)
    peft_model.save_pretrained(out)


def lora_config(ranks: dict[str, int], base_model_name_or_path: str):
    """A LoraConfig on exactly these modules (full names) at these ranks, lora_alpha = rank (scaling 1).

    peft takes one r and lora_alpha; modules of another rank (rank "full" over projections of different shapes) get
    their own in rank_pattern and alpha_pattern, whose keys peft reads as regexes: the names are escaped."""
    from peft import LoraConfig

    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(name): rank for name, rank in ranks.items() if rank != common_rank}
    return LoraConfig(r=common_rank, lora_alpha=common_rank, rank_pattern=others, alpha_pattern=dict(others),
                      target_modules=list(ranks), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name_or_path)


def _replace_adapted_linears(adapter: QuarantineAdapter,
                             weight_of: Callable[[SVDQuarantineLinear], torch.Tensor]) -> nn.Module:
    """Put a plain nn.Linear with weight `weight_of(layer)` (and the layer's own bias) in place of every adapted
    layer; the model is then the base architecture again, without bases or knobs. The adapter is spent."""
    for name, layer in adapter.layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight_of(layer), requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        parent, _, child = name.rpartition(".")
        setattr(adapter.model.get_submodule(parent), child, linear)
    return adapter.model


def _tied_adapted_weights(adapter: QuarantineAdapter) -> dict[str, set[str]]:
    """{adapted module: the other parameter names its weight is shared with}, for the adapted weights that are tied."""
    names = defaultdict(set)
    for name, parameter in adapter.model.named_parameters(remove_duplicate=False):
        names[id(parameter)].add(name)
    tied = {}
    for module, layer in adapter.layers.items():
        others = names[id(layer.weight)] - {f"{module}.weight"}
        if others:
            tied[module] = others
    return tied


def _check_out(out: Path, force: bool, keep: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; the export is a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; choose another folder, or pass --force to replace it")
    resolved = out.resolve()
    for folder in keep:
        folder = folder.resolve()
        if resolved == folder or resolved in folder.parents:
            raise ExportError(f"--out {out} is or contains {folder}, which the export reads; choose another folder")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
