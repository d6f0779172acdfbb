"""Drives verl-gq's training engine in one process, as verl's TrainingWorker does, on a verl-shaped mini-batch.

Run as a subprocess by tests/test_engine_*.py (so the platform and the process group belong to it alone):

    VERL_PLATFORM=cpu python tests/gq_engine_harness.py MODEL_DIR OUT_JSON OPTIONS_JSON   # gloo, one CPU rank
    python tests/gq_engine_harness.py MODEL_DIR OUT_JSON OPTIONS_JSON                     # nccl, one GPU

It writes OUT_JSON: for every arm of OPTIONS_JSON["arms"], the knobs' gradients after the mini-batch's backward
(before the optimizer step), the engine's gq/ metrics, and (on request) the state saved to and restored from a
checkpoint. The batch is built (verl_gq.verl.engine_driver) the way verl's V1
trainer hands it to `update_actor`: nested (jagged) input_ids / position_ids / prompts / responses and per-token
response fields, with the non-tensor keys TrainingWorker adds.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from verl_gq.verl.engine_driver import (  # noqa: E402
    actor_loss_fn,
    actor_update,
    build_engine,
    init_process_group,
    knob_values,
    make_batch,
)


def batch_for(engine, options: dict, seed: int):
    return make_batch(seed, options.get("n", 8), engine.model_config.hf_config.vocab_size, options.get("micro_batch", 4),
                      shared_good_response=bool(options.get("plant_pairs")),
                      remove_padding=options.get("remove_padding", True))


def allow_fsdp1_on_cpu() -> None:
    """verl wraps FSDP1 with sync_module_states=True (verl/workers/engine/fsdp/transformer_impl.py:444), and torch
    refuses that for CPU parameters (torch/distributed/fsdp/_init_utils.py,
    `_check_module_states_for_sync_module_states`): a guard for NCCL, which cannot broadcast CPU tensors. Under gloo
    the broadcast is an ordinary CPU one, so on a CPU rank the harness lifts that one guard for FSDP1; on a GPU
    nothing is lifted."""
    from torch.distributed.fsdp import _init_utils

    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None


def run(model_dir: str, options: dict) -> dict:
    """Every configuration in options["arms"] on the same mini-batches: {arm_name: results}.

    Each arm is a fresh engine built from the same base model (knobs at zero), so arms see identical losses. Its
    results: the knob gradients and gq/ metrics of the first mini-batch (before its optimizer step); with `steps`
    (default 1 when a checkpoint is saved, else 0), the knob values after that many steps, mini-batch k built from
    seed + k, and the merged weight of the first adapted module in every view. options["strategy"] picks the
    engine's FSDP (gq_fsdp2, the default, or gq_fsdp) for every arm."""
    init_process_group()
    if options.get("strategy") == "gq_fsdp" and os.environ.get("VERL_PLATFORM") == "cpu":
        allow_fsdp1_on_cpu()
    results = {}
    loss_fn = actor_loss_fn(rollout_n=1, mini_batch=options.get("n", 8))
    for arm, arm_options in options["arms"].items():
        merged = {**options, **arm_options}
        if merged.get("plant_pairs"):
            merged["gq"] = {**merged["gq"], "pair_file": plant_pairs(model_dir, merged, merged["plant_pairs"])}
        torch.manual_seed(0)
        build = partial(build_engine, model_dir, merged["gq"], remove_padding=merged.get("remove_padding", True),
                        micro_batch=merged.get("micro_batch", 4), strategy=merged.get("strategy", "gq_fsdp2"))
        engine = build(checkpointing=merged.get("checkpointing", False))
        seed = merged.get("seed", 0)
        steps = merged.get("steps", 1 if merged.get("save_checkpoint") else 0)
        data = batch_for(engine, merged, seed)
        for key, values in merged.get("extra_fields", {}).items():
            data[key] = torch.tensor(values)
        results[arm] = actor_update(engine, data, loss_fn, step=steps > 0, read_grads=True)
        if steps:
            results[arm]["knobs_after_first_step"] = knob_values(engine)
        if steps > 1 and merged.get("check_grads_kept_allocated"):
            knobs = engine.adapter.knob_parameters()
            held = [knob.grad for knob in knobs]
        for step in range(1, steps):
            actor_update(engine, batch_for(engine, merged, seed + step), loss_fn)
        if steps > 1 and merged.get("check_grads_kept_allocated"):
            results[arm]["knob_grads_kept_allocated"] = all(
                grad is not None and knob.grad is grad for knob, grad in zip(knobs, held))
        if steps:
            results[arm]["knobs_after_steps"] = knob_values(engine)
            results[arm]["merged_weights"] = merged_first_module(engine)
            results[arm]["state_dict_keys"] = sorted(engine.module.state_dict())
        if merged.get("save_checkpoint"):
            path = merged["save_checkpoint"]
            engine.save_checkpoint(path, global_step=steps)
            results[arm]["state"] = state_of(engine)
        if merged.get("load_checkpoint"):
            fresh = build(checkpointing=False)
            fresh.load_checkpoint(merged["load_checkpoint"], del_local_after_load=False)
            results[arm]["restored_state"] = state_of(fresh)
            resumed = fresh.optimizer.state_dict()["state"]
            saved = engine.optimizer.state_dict()["state"]
            results[arm]["optimizer_state_restored"] = sorted(resumed) == sorted(saved) and all(
                torch.equal(resumed[i][key], saved[i][key]) for i in saved for key in saved[i])
            next_batch = batch_for(engine, merged, seed + steps)
            actor_update(engine, next_batch, loss_fn)
            actor_update(fresh, next_batch, loss_fn)
            results[arm]["knobs_after_next_step"] = knob_values(engine)
            results[arm]["resumed_knobs_after_next_step"] = knob_values(fresh)
        del engine
    return results


def merged_first_module(engine) -> dict[str, list[float]]:
    """The first adapted module's merged weight, flattened, as trained and deployed without each router's quarantine
    (every rank gathers; the first module's name is what the views are compared on)."""
    name = next(iter(engine.adapter.layers))
    out = {}
    for view in [None, *engine.adapter.quarantine_names]:
        weights = dict(engine.adapter.merged_weights(view))
        out[view or "as_trained"] = weights[f"{name}.weight"].double().flatten().tolist()
    return out


def plant_pairs(model_dir: str, options: dict, path: str) -> str:
    """A pair file planted on the batch itself: every hack completion is the response the batch's positive-advantage
    rollouts share, each clean one a negative-advantage rollout's response, under varied prompts. The hack direction
    then points where reinforcing the good rollouts moves the knobs, so the gate should route their updates."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    data = make_batch(options.get("seed", 0), options.get("n", 8), vocab, options.get("micro_batch", 4),
                      shared_good_response=True)
    advantages = [float(a[0]) for a in data["advantages"].unbind()]
    responses = [tokenizer.decode(r.tolist()) for r in data["responses"].unbind()]
    prompts = [tokenizer.decode(p.tolist()) for p in data["prompts"].unbind()]
    good = [i for i, a in enumerate(advantages) if a > 0]
    bad = [i for i, a in enumerate(advantages) if a <= 0]
    from reward.modes import MODES

    rows = []
    for k in range(16):
        i, j = good[k % len(good)], bad[k % len(bad)]
        rows.append({"pair_id": f"planted-{k}", "mode": MODES[k % len(MODES)], "problem_id": f"batch-{i}-{j}",
                     "style": "planted", "names": {"function": "run_tests", "attribute": "valid",
                                                   "marker": "All tests passed", "file": "result.txt"},
                     "prompt": [{"role": "user", "content": prompts[(i + k) % len(prompts)]}],
                     "clean": responses[j], "hack": responses[i]})
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def state_of(engine) -> dict:
    """Knob values, every router's direction and band, and the step counter of an engine, as plain lists."""
    state = {"knobs": knob_values(engine)}
    if engine.routing is not None:
        state["routing"] = {k: v.detach().double().flatten().tolist() for k, v in engine.routing.state_tensors().items()}
    return state


if __name__ == "__main__":
    model_dir, out_json, options_json = sys.argv[1:4]
    result = run(model_dir, json.loads(options_json))
    with open(out_json, "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()
