"""Stand-alone deploy evaluation of a saved run: the base model plus the run's knobs, sampled as trained and deployed
without each router's quarantine on the evaluation split of every mode, graded by the substrate's graders.

It needs no verl and no rollout server: Hugging Face generation on the base model with the adapter injected and
`train.safetensors` loaded (the file's basis fingerprints must match the base model, else it refuses). Inside a
training run the gq trainer writes the same file from verl's own validation (verl_gq/verl/trainer.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reward.dataset import grading_task
from reward.grader import grade_batch
from reward.modes import MODES, randomised_names
from reward.prompts import build_messages
from verl_gq.adapter.model import adapter_config_of, inject_quarantine_adapter
from verl_gq.eval.artifacts.samples import block_of, view_samples
from verl_gq.eval.artifacts.schema import EvalBlock
from verl_gq.eval.settings import DeploySettings
from verl_gq.models.sampling import sample_answers


def select_rows(frame: pd.DataFrame, n_prompts: int, seed: int) -> pd.DataFrame:
    """n_prompts rows, the same number from every mode present, chosen by `seed` (an error if a mode lacks rows)."""
    modes = frame["extra_info"].map(lambda e: e["mode"])
    present = [m for m in MODES if (modes == m).any()]
    if not present or n_prompts % len(present):
        raise ValueError(f"n_prompts={n_prompts} must be a positive multiple of the {len(present)} modes present")
    per_mode = n_prompts // len(present)
    chosen = []
    for mode in present:
        rows = frame[modes == mode]
        if len(rows) < per_mode:
            raise ValueError(f"mode {mode}: {per_mode} prompts asked for but the file has {len(rows)}")
        chosen.append(rows.sample(n=per_mode, random_state=seed))
    return pd.concat(chosen)


def load_model_with_knobs(model_path: str, train_file: Path, device: str):
    """Base model + tokenizer with the adapter of `train_file` injected and loaded; returns (model, tokenizer,
    adapter)."""
    adapter_config = adapter_config_of(train_file)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    adapter = inject_quarantine_adapter(model, adapter_config)
    adapter.load(train_file)
    return model, tokenizer, adapter


AS_TRAINED = "as_trained"
BASE = "base"  # the adapter disabled: the model the run started from


def evaluate(model_path: str, train_file: Path, eval_file: Path, settings: DeploySettings, *, step: int,
             views: Optional[list[str]] = None) -> pd.DataFrame:
    """Every graded answer (artifacts.samples: view, prompt, mode, sample, solve, hack, channel, length) of
    n_prompts x group samples at the settings, for `views`: "as_trained", a router's name (deployed without its
    quarantine) or "base" (the base model the run started from, same prompts and sampling). Default: as trained,
    then every router of the file. `step`: the saved knobs' step, recorded with each sample."""
    model, tokenizer, adapter = load_model_with_knobs(model_path, train_file, settings.device)
    views = views or [AS_TRAINED, *adapter.quarantine_names]
    rows = select_rows(pd.read_parquet(eval_file), settings.n_prompts, settings.seed)
    rng = random.Random(settings.seed)
    tasks, prompts, prompt_ids = [], [], []
    for _, row in rows.iterrows():
        task = grading_task(row["reward_model"]["ground_truth"], dict(row["extra_info"]))
        names = randomised_names(rng, avoid=task.problem.method_name) if settings.randomise_names else task.names
        text = tokenizer.apply_chat_template(build_messages(task.problem, task.mode, names),
                                             add_generation_prompt=True, tokenize=False)
        for _ in range(settings.group):
            tasks.append((task.problem, task.mode, names))
            prompts.append(text)
            prompt_ids.append(int(row["extra_info"]["index"]))
    frames = []
    for view in views:
        with adapter.disabled() if view == BASE else adapter.viewing(None if view == AS_TRAINED else view):
            answers = sample_answers(model, tokenizer, prompts, settings.temperature, settings.max_new_tokens,
                                     settings.batch_size, settings.seed, settings.device, progress=f"sampling {view}")
        verdicts = grade_batch([(problem, answer, mode, names) for (problem, mode, names), answer in zip(tasks, answers)])
        frames.append(view_samples(view, step, prompt_ids, [mode for _, mode, _ in tasks],
                                   [bool(v.solve) for v in verdicts], [bool(v.hack) for v in verdicts],
                                   [bool(v.channel) for v in verdicts], [len(a) for a in answers]))
    return pd.concat(frames, ignore_index=True)


def view_blocks(samples: pd.DataFrame) -> dict[str, EvalBlock]:
    """{view: per-mode rates} of an evaluation's samples, in the views' order."""
    return {view: block_of(samples[samples["view"] == view], eval_modes=list(MODES))
            for view in samples["view"].unique()}
