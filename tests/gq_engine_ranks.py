"""Drives the gq engine on one or several gloo ranks (CPU) over the SAME global mini-batch, as verl's data-parallel
actor update does: every rank builds the engine (FSDP2 shards the model over the ranks), takes its contiguous
share of the global batch (rank k: rows [k n/W, (k+1) n/W), verl's chunked DP dispatch) with the non-tensor keys
TrainingWorker hands every rank (global_batch_size = the whole mini-batch; the engine adds dp_size and the
all-reduced batch_num_tokens), runs forward/backward and one optimizer step.

    python tests/gq_engine_ranks.py MODEL_DIR OUT_DIR OPTIONS_JSON    # one rank (a world of one)
    launch({1: OUT_1, 2: OUT_2}, model_dir, options, pythonpath)     # a 1-rank and a 2-rank world, from a test

Importing this module has no side effect (the rank processes set VERL_PLATFORM=cpu themselves), so a test can
import `launch`; verl is imported inside the rank processes only.

Each rank writes OUT_DIR/rank<k>.json: for every arm of OPTIONS_JSON["arms"] and each of its `steps` optimizer steps
(default 1; later steps rerun the same mini-batch), the knobs' full gradients after the backward (before the step),
the gq/ metrics and the knob values after the step; then the routers' state after the last step (direction tensors,
bands, step counter) as the controller saves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from verl_gq.verl.engine_driver import (
    actor_loss_fn,
    actor_update,
    build_engine,
    free_port,
    init_process_group,
    knob_values,
    make_batch,
)

SCRIPT = Path(__file__).resolve()


def local_share(data, rank: int, world_size: int):
    """This rank's rows of the global mini-batch, as verl's DP dispatch chunks it (non-tensor keys go along)."""
    from verl.utils import tensordict_utils as tu

    return tu.chunk_tensordict(data, world_size)[rank] if world_size > 1 else data


def run(model_dir: str, options: dict) -> dict:
    init_process_group()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n, micro_batch = options.get("n", 8), options.get("micro_batch", 2)
    loss_fn = actor_loss_fn(rollout_n=1, mini_batch=n)
    results = {}
    for arm, arm_options in options["arms"].items():
        merged = {**options, **arm_options}
        gq = dict(merged["gq"])
        if merged.get("plant_pairs"):
            from gq_engine_harness import plant_pairs

            path = f"{merged['plant_pairs']}.w{world_size}"
            if rank == 0:
                plant_pairs(model_dir, {"n": n, "micro_batch": micro_batch, "seed": merged.get("seed", 0)}, path)
            dist.barrier()
            gq["pair_file"] = path
        torch.manual_seed(0)
        engine = build_engine(model_dir, gq, remove_padding=merged.get("remove_padding", True),
                              checkpointing=False, micro_batch=micro_batch)
        assert engine.get_data_parallel_size() == world_size
        data = make_batch(merged.get("seed", 0), n, engine.model_config.hf_config.vocab_size, micro_batch,
                          shared_good_response=bool(merged.get("plant_pairs")),
                          remove_padding=merged.get("remove_padding", True))
        data = local_share(data, rank, world_size)
        out = {"steps": [], "local_rows": len(data), "global_batch_size": data["global_batch_size"],
               "knob_shard": knob_shard(engine)}
        for _ in range(merged.get("steps", 1)):  # further steps: the same mini-batch again, like ppo_epochs
            started = time.perf_counter()
            step = actor_update(engine, data, loss_fn, step=True, read_grads=True)
            step["update_seconds"] = time.perf_counter() - started
            step["knobs"] = knob_values(engine)
            out["steps"].append(step)
        out.update(state_after_step(engine))
        results[arm] = out
        del engine
    return results


def knob_shard(engine) -> dict:
    """How FSDP2 holds the first module's knobs on this rank: placements, local and full element counts."""
    knob = next(iter(engine.adapter.layers.values())).knobs
    local = knob.to_local() if hasattr(knob, "to_local") else knob
    return {"placements": str(getattr(knob, "placements", None)), "local_numel": local.numel(),
            "numel": knob.numel()}


def state_after_step(engine) -> dict:
    """The routers' saved state (every direction tensor, band, step counter) as lists."""
    if engine.routing is None:
        return {}
    return {"routing_state": {k: v.detach().double().flatten().tolist()
                              for k, v in engine.routing.state_tensors().items()}}


def launch(worlds: dict[int, Path], model_dir, options: dict, pythonpath: str,
           timeout: float = 300) -> dict[int, list[dict]]:
    """Run this script as a world of W ranks (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, one thread each) for each
    {W: out_dir} of `worlds`, all worlds at once (a 1-rank world mostly leaves the second core idle), and return
    {W: every rank's result in rank order}. A rank that fails or outlives `timeout` fails the launch; every process
    is stopped by its own pid."""
    procs = []  # (world_size, rank, process, log)
    for world_size, out_dir in worlds.items():
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "VERL_PLATFORM": "cpu",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
        for rank in range(world_size):
            log = open(out_dir / f"rank{rank}.log", "w")
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(model_dir), str(out_dir), json.dumps(options)],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT,
            )
            procs.append((world_size, rank, proc, log))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while failed is None and any(proc.poll() is None for _, _, proc, _ in procs):
            for world_size, rank, proc, _ in procs:
                if proc.poll() not in (None, 0):
                    failed = f"rank {rank} of {world_size} exited with {proc.returncode}"
            if failed is None and time.monotonic() > deadline:
                failed = f"still running after {timeout}s"
            time.sleep(0.2)
        failed = failed or next((f"rank {r} of {w} exited with {p.returncode}"
                                 for w, r, p, _ in procs if p.returncode != 0), None)
    finally:
        for _, _, proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        tails = "\n".join(f"--- rank {r} of {w} ---\n" + (Path(worlds[w]) / f"rank{r}.log").read_text()[-4000:]
                          for w, r, _, _ in procs)
        raise RuntimeError(f"launch failed: {failed}\n{tails}")
    return {w: [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(w)]
            for w, out_dir in worlds.items()}


if __name__ == "__main__":
    # here, not at import: a test imports this module for `launch` and its own process must keep its settings
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_dir, out_dir, options_json = sys.argv[1:4]
    result = run(model_dir, json.loads(options_json))
    result["cpu_seconds"] = time.process_time()  # this rank's CPU time, imports included
    import verl_gq

    result["verl_gq_file"] = verl_gq.__file__
    with open(Path(out_dir) / f"rank{dist.get_rank()}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()
