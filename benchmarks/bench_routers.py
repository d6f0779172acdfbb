"""Actor-update cost of routers against vanilla, through the real gq engine (verl's FSDP2 engine, verl's ppo_loss).

    python benchmarks/bench_routers.py --shape qwen3-1.7b                  # a GPU: bf16, 16 x (1536 + 1536) tokens
    python benchmarks/bench_routers.py --shape qwen3-4b --arms vanilla,study --repeats 1 --ranks 64 \
        --checkpointing on --micro-batch 8                                 # the paper recipe's actor update: fits?
    python benchmarks/bench_routers.py --shape tiny                        # CPU, CI-sized: the same tables

Per (rank, checkpointing) it builds ONE engine carrying the study's routers (recipes/study.yaml: route2b,
route2b_token, route2b_frozen, route2b_heldout, random_v matched to route2b, constant_w) with directions frozen
after their first extraction, and switches the arm between steps through the engine's own `set_active_routers`, so
every arm runs on the same weights, shards, optimizer and allocator:
  vanilla         no router active: the plain capture, the knobs' gradient by ordinary autograd
  route2b         one router, per rollout (padded batches stash by broadcasting over whole rows)
  route2b_token   one router, per token
  study           every router of the study on one run
  route2b_gather  route2b stashing by the per-position gather that packed (remove-padding) batches use, on the same
                  padded batch (`engine.position_gather`): the packed path's stash cost without flash-attn
Arms alternate step by step (one warm-up step each first); each timed step is zero_grad + forward/backward of the
whole mini-batch + optimizer step, synchronised. It prints per arm the median step time, its ratio to vanilla's, the
paired ratio (each step against the vanilla step of the same repeat: drifts of the machine cancel) and the peak
memory with its ratio to vanilla's; then, from one profiled step per arm (torch.profiler), the host time of the
engine's routing regions (`gq:route`, `gq:finish`, `gq:write`, `gq:segments`, `gq:optimizer`) and the device-busy
time; then the direction refresh's cost against a vanilla step. `--json PATH` writes every measurement; `--report
PATH` prints the tables of such a file again (no run). The batch is random tokens of the stated lengths; the pair set
is the shipped one, tokenized by the benchmark model's small local tokenizer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

SHAPES = {
    # config.json of the hub models (28/36 layers, 16/32 heads of 128 with 8 kv heads), random weights
    "qwen3-1.7b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab_size=151936),
    "qwen3-4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab_size=151936),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab_size=None),
}
STUDY_ROUTERS = {
    "route2b": {"granularity": "rollout"},
    "route2b_token": {"granularity": "token"},
    "route2b_frozen": {"granularity": "rollout"},
    "route2b_heldout": {"direction_modes": ["run_tests", "stdout_marker"]},
    "random_v": {"direction": "haar", "band": "frout_match", "match": "route2b"},
    "constant_w": {"band": "constant", "match": "route2b"},
}
# arm -> (active routers, stash by the per-position gather)
ARMS = {
    "vanilla": ([], False),
    "route2b": (["route2b"], False),
    "route2b_token": (["route2b_token"], False),
    "study": (list(STUDY_ROUTERS), False),
    "route2b_gather": (["route2b"], True),
}
REGIONS = ("gq:route", "gq:finish", "gq:write", "gq:segments", "gq:optimizer")


def build_model_dir(shape: str, out_dir: str, device: str) -> str:
    from verl_gq.models import build_qwen_model, tiny_corpus, train_tokenizer

    tokenizer = train_tokenizer(tiny_corpus(), 512)
    build_qwen_model(tokenizer, family="qwen3", max_position_embeddings=8192, dtype="bfloat16" if device == "cuda"
                     else "float32", device=device, out_dir=out_dir, **SHAPES[shape])
    return out_dir


def write_pair_subset(per_mode: int, out_path: str) -> str:
    """The first `per_mode` shipped pairs of each mode (the refresh cost grows with the pair count)."""
    from reward.modes import MODES
    from reward.pairs import SHIPPED_PAIRS

    rows = [json.loads(line) for line in open(SHIPPED_PAIRS) if line.strip()]
    keep = [r for mode in MODES for r in [x for x in rows if x["mode"] == mode][:per_mode]]
    with open(out_path, "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in keep))
    return out_path


def select_arm(engine, arm: str) -> None:
    routers, gather = ARMS[arm]
    engine.set_active_routers(routers)
    engine.position_gather = gather


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_update(engine, data, loss_fn, device: str) -> tuple[float, float]:
    """One actor update (seconds) and its peak memory (GiB; CPU: nan). The garbage of the previous step is collected
    before the clock starts, so no arm pays for another's."""
    import torch

    from verl_gq.verl.engine_driver import actor_update

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    actor_update(engine, data, loss_fn)
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return elapsed, peak


def profiled_step(engine, data, loss_fn, device: str, out_path: str) -> dict:
    """One actor update under torch.profiler. Writes the op tables (by device and by host time) and the host-device
    syncs by caller to `out_path`; returns the step's wall time, device-busy time (its kernels), host time in ATen
    ops, syncs, and the host time of each of the engine's routing regions (its record_function ranges), seconds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof, counted_syncs(device) as syncs:
        wall, _ = timed_update(engine, data, loss_fn, device)
    averages = prof.key_averages()
    with open(out_path, "w") as fh:
        for key in ("self_device_time_total", "self_cpu_time_total"):
            fh.write(f"sorted by {key}\n{averages.table(sort_by=key, row_limit=40, max_name_column_width=60)}\n")
        if syncs is not None:
            fh.write("host-device syncs by caller\n" + "".join(f"{n:6d}  {where}\n" for where, n in syncs.most_common()))
    host_events = [e for e in averages if e.device_type == DeviceType.CPU]
    return {
        "wall": wall,
        "syncs": None if syncs is None else sum(syncs.values()),
        "device_busy": sum(e.self_device_time_total for e in averages
                           if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e6,
        "aten_host": sum(e.self_cpu_time_total for e in host_events if e.key.startswith("aten::")) / 1e6,
        "ops": sum(e.count for e in host_events if e.key.startswith("aten::")),
        "regions_host": {region: sum(e.cpu_time_total for e in host_events if e.key == region) / 1e6
                         for region in REGIONS},
    }


class counted_syncs:
    """On a GPU, counts the host-device syncs made while active by their Python caller (a Counter of "file:line"):
    torch's sync debug mode warns at each synchronizing call. On a CPU there is nothing to count: yields None."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self):
        import warnings
        from collections import Counter

        import torch

        if self.device != "cuda":
            return None
        self.syncs = Counter()
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self.syncs

    def __exit__(self, *exc) -> None:
        import torch

        if self.device != "cuda":
            return
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("default")
        self.caught.__exit__(*exc)
        self.syncs.update(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in self.records
                          if "synchronizing" in str(w.message))


def bench_config(model_dir: str, pair_file: str, args, rank, checkpointing: bool, device: str) -> dict:
    import torch

    from verl_gq.verl.engine_driver import actor_loss_fn, actor_update, build_engine, make_batch

    micro_batch = args.micro_batch if checkpointing else args.micro_batch_no_ckpt
    routers = {name: {"refresh": 0, **spec} for name, spec in STUDY_ROUTERS.items()}
    gq = {"rank": rank, "pair_file": pair_file, "max_pair_tokens": 16384, "routers": routers}
    started = time.perf_counter()
    engine = build_engine(model_dir, gq, remove_padding=False, checkpointing=checkpointing, micro_batch=micro_batch,
                          precision="bf16" if device == "cuda" else "fp32", lr=1e-6)
    build_seconds = time.perf_counter() - started
    vocab = engine.model_config.hf_config.vocab_size
    data = make_batch(0, args.n, vocab, micro_batch, prompt_len=(args.prompt, args.prompt + 1),
                      response_len=(args.response, args.response + 1), remove_padding=False)
    loss_fn = actor_loss_fn(rollout_n=1, mini_batch=args.n)
    arms = args.arms
    times = {arm: [] for arm in arms}
    peaks = {arm: [] for arm in arms}
    knobs_stepped = {}
    select_arm(engine, "study")  # every direction extracted once, before any timed step
    with engine.train_mode():
        engine.routing.refresh()
    for arm in arms:  # warm-up (allocator, kernels)
        select_arm(engine, arm)
        grads = actor_update(engine, data, loss_fn, read_grads=True)["grads"]
        knobs_stepped[arm] = sum(columns["effective"] is not None for columns in grads.values())
    for _ in range(args.repeats):
        for arm in arms:
            select_arm(engine, arm)
            elapsed, peak = timed_update(engine, data, loss_fn, device)
            times[arm].append(elapsed)
            peaks[arm].append(peak)
    profiles = {}
    for arm in arms if args.profile_steps else ():
        select_arm(engine, arm)
        tag = f"r{rank}_ckpt{'on' if checkpointing else 'off'}_{arm}"
        profiles[arm] = profiled_step(engine, data, loss_fn, device, os.path.join(args.out_dir, f"{tag}.txt"))
    refresh = []
    select_arm(engine, "study")
    for _ in range(args.refresh_repeats):
        synchronize(device)
        start = time.perf_counter()
        with engine.train_mode():
            engine.routing.refresh()
        synchronize(device)
        refresh.append(time.perf_counter() - start)
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"rank": rank, "checkpointing": checkpointing, "micro_batch": micro_batch, "build_seconds": build_seconds,
            "times": times, "peaks": peaks, "knobs_stepped": knobs_stepped, "profiles": profiles, "refresh": refresh}


def report(result: dict, refresh_every: int) -> None:
    times, peaks = result["times"], result["peaks"]
    base_t = statistics.median(times["vanilla"])
    base_m = max(peaks["vanilla"])
    print(f"\nrank={result['rank']} checkpointing={'on' if result['checkpointing'] else 'off'} "
          f"micro_batch={result['micro_batch']} (engine build {result['build_seconds']:.0f}s)")
    for arm, t in times.items():
        ratio = statistics.median(t) / base_t
        paired = [x / v for x, v in zip(t, times["vanilla"])]
        pairs = f"  paired x{statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]"
        memory = ""
        if peaks[arm][0] == peaks[arm][0]:  # not nan: a GPU run
            memory = f"  peak {max(peaks[arm]):6.2f} GiB  x{max(peaks[arm]) / base_m:.3f}"
        print(f"  {arm:14s} step {statistics.median(t):8.4f}s  x{ratio:.3f} vs vanilla"
              f"{'' if arm == 'vanilla' else pairs}{memory}")
    for arm, p in result["profiles"].items():
        regions = "  ".join(f"{name.split(':')[1]} {value * 1000:.1f}" for name, value in p["regions_host"].items())
        syncs = "" if p["syncs"] is None else f", {p['syncs']} host-device syncs"
        print(f"  {arm:14s} profiled: wall {p['wall']:.3f}s, device busy {p['device_busy']:.3f}s, host in {p['ops']} "
              f"ATen ops {p['aten_host']:.3f}s{syncs}; routing regions, host ms: {regions}")
    if result["refresh"]:
        r = statistics.median(result["refresh"])
        print(f"  refresh of every direction {r:.3f}s = x{r / base_t:.3f} of a vanilla step; amortised at "
              f"refresh={refresh_every}: +{r / refresh_every / base_t * 100:.1f}% per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--arms", default="vanilla,route2b,route2b_token,study,route2b_gather",
                        help=f"comma-separated, vanilla first, from {list(ARMS)}")
    parser.add_argument("--ranks", help="comma-separated ints and/or 'full' (default 64 GPU; 8 CPU)")
    parser.add_argument("--checkpointing", default="on", help="comma-separated on/off")
    parser.add_argument("--n", type=int, help="sequences per mini-batch (default 16 GPU, 8 CPU)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 1536 GPU, 24 CPU)")
    parser.add_argument("--response", type=int, help="response tokens (default 1536 GPU, 24 CPU)")
    parser.add_argument("--micro-batch", type=int, default=4, help="micro-batch with checkpointing")
    parser.add_argument("--micro-batch-no-ckpt", type=int, default=4, help="micro-batch without checkpointing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refresh-repeats", type=int, help="default 2 GPU, 1 CPU; 0 skips the refresh")
    parser.add_argument("--pairs-per-mode", type=int, help="shipped pairs per mode (default: all 18 GPU, 2 CPU)")
    parser.add_argument("--refresh-every", type=int, default=5)
    parser.add_argument("--no-profile", dest="profile_steps", action="store_false",
                        help="skip the profiled step per arm")
    parser.add_argument("--out-dir", default="bench_out", help="profiles are written here")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved --json run and exit")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as fh:
            saved = json.load(fh)
        print(f"{saved['args']['shape']} on {saved['device']}, saved run {args.report}")
        for result in saved["results"]:
            report(result, saved["args"]["refresh_every"])
        return
    args.arms = args.arms.split(",")
    if args.arms[0] != "vanilla" or not set(args.arms) <= set(ARMS):
        parser.error(f"--arms must start with vanilla and name arms of {list(ARMS)}")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("VERL_PLATFORM", "cpu")
    big = device == "cuda"
    args.ranks = args.ranks or ("64" if big else "8")
    args.n = args.n or (16 if big else 8)
    args.prompt = args.prompt or (1536 if big else 24)
    args.response = args.response or (1536 if big else 24)
    args.pairs_per_mode = args.pairs_per_mode or (18 if big else 2)
    args.refresh_repeats = (2 if big else 1) if args.refresh_repeats is None else args.refresh_repeats
    os.makedirs(args.out_dir, exist_ok=True)

    from verl_gq.verl.engine_driver import init_process_group

    init_process_group()
    ranks = [r if r == "full" else int(r) for r in args.ranks.split(",")]
    print(f"{args.shape} on {device} ({torch.cuda.get_device_name() if big else f'{os.cpu_count()} cores'}), "
          f"{args.n} x ({args.prompt} + {args.response}) tokens per mini-batch, {args.repeats} alternating repeats, "
          f"{args.pairs_per_mode} pairs per mode; torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.shape, os.path.join(tmp, "model"), device)
        pair_file = write_pair_subset(args.pairs_per_mode, os.path.join(tmp, "pairs.jsonl"))
        for rank in ranks:
            for checkpointing in (c == "on" for c in args.checkpointing.split(",")):
                result = bench_config(model_dir, pair_file, args, rank, checkpointing, device)
                report(result, args.refresh_every)
                results.append(result)
                if args.json:  # after every configuration: a run cut short keeps what it measured
                    with open(args.json, "w") as fh:
                        json.dump({"args": vars(args), "device": device, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
