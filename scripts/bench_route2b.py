"""Actor-update cost of route2b against vanilla, through the real gq engine (verl's FSDP2 engine, verl's ppo_loss).

    python scripts/bench_route2b.py --shape qwen3-1.7b                  # the H100: bf16, 16 x (1536 + 1536) tokens
    python scripts/bench_route2b.py --shape tiny                        # CPU, CI-sized: the same ratios, tiny model

Per (rank, checkpointing) it builds ONE engine (method route2b, direction frozen after its first extraction) and
switches the arm on it between steps, so every arm runs on the same weights, shards and allocator:
  vanilla         the same adapter, no routing: keep-knob gradients by plain autograd (the vanilla arm's path)
  route2b         per-rollout stash -> gate -> route (the engine's route2b path, granularity rollout)
  route2b_token   per-token stash and gate (granularity token)
  route2b_gather  (--gather-arm) route2b, stashing by the per-position gather that packed (remove-padding) batches
                  use, on the same padded batch: the packed path's stash cost without flash-attn
Arms alternate step by step (one warm-up step each first); each timed step is zero_grad + forward/backward of the
whole mini-batch + optimizer step, synchronised. It prints per arm the median step time, the ratio to vanilla's
median, the paired ratio (each step against the vanilla step of the same repeat, median and min-max: drifts of the
machine cancel), and the peak memory of the step with its ratio to vanilla's; then, from one more step per arm with
events around the knob product (`apply`), route2b's per-micro-batch and per-step code (gate + route, reduce,
knob-gradient writes, segments) and the optimizer, the time each takes per step; then the direction refresh's
cost per refresh and amortised over refresh = 5 optimizer steps, against a vanilla step.
The batch is random tokens of the stated lengths (the cost does not depend on their values); the pair set is the
shipped one, tokenized by the benchmark model's small local tokenizer (longer token sequences than Qwen's).
`--json PATH` also writes every measurement; `--report PATH` prints the tables of such a file again (no run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time

SHAPES = {
    # Qwen3-1.7B's config.json (hub): 28 layers, hidden 2048, 16 heads of 128 with 8 kv heads, MLP 6144, vocab 151936
    "qwen3-1.7b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144, vocab_size=151936),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab_size=None),
}
ARMS = ("vanilla", "route2b", "route2b_token")
GATHER_ARM = "route2b_gather"


def build_model_dir(shape: str, out_dir: str, device: str) -> str:
    from verl_gq.models import build_qwen_model, tiny_corpus, train_tokenizer

    tokenizer = train_tokenizer(tiny_corpus(), 512)
    dims = SHAPES[shape]
    build_qwen_model(tokenizer, family="qwen3", max_position_embeddings=8192, dtype="bfloat16" if device == "cuda"
                     else "float32", device=device, out_dir=out_dir, **dims)
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


class ArmSwitch:
    """Points one engine at one arm's code path between steps.

    vanilla = no controller: the engine's plain-capture path, where the quarantine row is detached and gets a zero
    gradient, exactly as in an engine built with method vanilla. route2b keeps its knob gradients allocated between
    steps (the engine zeroes them in place); an engine of method vanilla holds none over (verl sets them to None),
    so the vanilla arm runs with them set aside and the next route2b step gets them back. route2b_gather is route2b
    with the engine's segments rebuilt for the gather (`gathered_segments`)."""

    def __init__(self, engine) -> None:
        self.engine, self.controller, self.base_gq = engine, engine.route2b, engine.gq
        self.held_grads = None

    def __call__(self, arm: str) -> None:
        engine, knobs = self.engine, self.engine.adapter.knob_parameters()
        engine.__dict__.pop("_host_segments_of", None)  # the class's own, unless this arm forces the gather
        if arm == GATHER_ARM:
            engine._host_segments_of = functools.partial(gathered_segments, engine._host_segments_of)
        if arm == "vanilla":
            if engine.route2b is not None:
                self.held_grads = [knob.grad for knob in knobs]
                for knob in knobs:
                    knob.grad = None
            engine.route2b = None
            return
        if engine.route2b is None and self.held_grads is not None:
            for knob, grad in zip(knobs, self.held_grads):
                knob.grad = grad
            self.held_grads = None
        gq = dataclasses.replace(self.base_gq, granularity="token" if arm == "route2b_token" else "rollout")
        engine.gq = self.controller.gq = gq
        engine.route2b = self.controller


def gathered_segments(host_segments_of, micro_batch):
    """The engine's segments with each padded batch row's positions gathered per position (the packed path's stash)
    instead of broadcast: the same rows, so the same routing."""
    from verl_gq.routing import Segments

    segments = host_segments_of(micro_batch)
    if not segments.batch_rows:
        raise RuntimeError(f"{GATHER_ARM} needs padded per-rollout segments (batch rows)")
    return Segments(segments.example_of_position, segments.n_examples)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_update(engine, data, loss_fn, device: str) -> tuple[float, float]:
    """One actor update (seconds) and its peak memory (GiB; CPU: nan). The garbage of the previous step is collected
    before the clock starts, so no arm pays for another's."""
    import gc

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


def step_regions() -> list[tuple[str, type, str]]:
    """The parts of an actor step the arms may differ in, as (region, class, method); a region may span several
    methods. Every arm runs `apply` (the knob product in each adapted module's forward: plain for vanilla, the
    per-row gather for route2b) and `optimizer`; the rest is route2b's own code. The stash itself is autograd's
    backward of the gather, in C++ inside the model's backward: no region times it, the step ratios count it."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    from verl_gq.routing.capture import KnobGradientCapture
    from verl_gq.routing.router import GradientRouter
    from verl_gq.verl.engine import GQFSDPEngineWithLMHead
    from verl_gq.verl.route2b import Route2bController

    return [
        ("apply", KnobGradientCapture, "_apply_plain"),  # per module, forward (and its recompute under checkpointing)
        ("apply", KnobGradientCapture, "_apply_stash"),
        ("gate+route", Route2bController, "route_stashed"),  # per micro-batch: flatten the stash, gate, route
        ("reduce", GradientRouter, "finish"),  # per step: all-reduce, metrics (one host sync)
        ("write", GQFSDPEngineWithLMHead, "_write_knob_grads"),  # per step: the routed gradients onto the knobs
        ("segments", GQFSDPEngineWithLMHead, "_segments_of"),  # per micro-batch: index tensors to the device
        ("optimizer", FSDPEngine, "optimizer_step"),  # per step: clipping and AdamW over the knobs
    ]


# (+ "knob backward": the Python autograd function's backward, stash included, in runs before the autograd stash)
ROUTE2B_ONLY = ("knob backward", "gate+route", "reduce", "write", "segments")


@contextlib.contextmanager
def patched_regions(wrap):
    """Replaces every region's method (step_regions) by `wrap(region, function)` while active."""
    saved = []
    for name, cls, method in step_regions():
        original = cls.__dict__[method]  # each region is patched where it is defined
        saved.append((cls, method, original))
        is_static = isinstance(original, staticmethod)
        wrapped = functools.wraps(original.__func__ if is_static else original)(
            wrap(name, original.__func__ if is_static else original))
        setattr(cls, method, staticmethod(wrapped) if is_static else wrapped)
    try:
        yield
    finally:
        for cls, method, original in saved:
            setattr(cls, method, original)


@contextlib.contextmanager
def timed_regions(device: str):
    """Times every call of the step's regions (step_regions) while active: on a GPU by a pair of CUDA events around
    the call (the stream runs in order, so the pair spans the kernels the call launched, plus any wait for the host
    inside it); on a CPU by the wall clock. Yields {region: [(start, end), ...]}; `region_seconds` sums them after a sync."""
    import torch

    calls = {name: [] for name, _, _ in step_regions()}

    def mark():
        if device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wrap(name, function):
        def timed(*args, **kwargs):
            start = mark()
            try:
                return function(*args, **kwargs)
            finally:
                calls[name].append((start, mark()))
        return timed

    with patched_regions(wrap):
        yield calls


def profiled_step(engine, data, loss_fn, device: str, out_path: str) -> dict:
    """One actor update under torch.profiler, each region inside a `record_function("region:<name>")`. Writes the op
    tables (by device time and by host time) to `out_path` and returns the step's device-busy time (the sum of its
    kernels), its host time in ATen ops, and each region's host time, in seconds: a step whose wall time exceeds its
    device-busy time by much is waiting for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    def wrap(name, function):
        def recorded(*args, **kwargs):
            with record_function(f"region:{name}"):
                return function(*args, **kwargs)
        return recorded

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with patched_regions(wrap), profile(activities=activities) as prof, counted_syncs(device) as syncs:
        wall, _ = timed_update(engine, data, loss_fn, device)
    averages = prof.key_averages()
    with open(out_path, "w") as fh:
        for key in ("self_device_time_total", "self_cpu_time_total"):
            fh.write(f"sorted by {key}\n{averages.table(sort_by=key, row_limit=40, max_name_column_width=60)}\n")
        if syncs is not None:
            callers = "".join(f"{n:6d}  {where}\n" for where, n in syncs.most_common())
            fh.write(f"host-device syncs by caller\n{callers}")
    host_events = [e for e in averages if e.device_type == DeviceType.CPU]
    return {
        "wall": wall,
        "syncs": None if syncs is None else sum(syncs.values()),
        # kernels only, as the table's "Self CUDA time total" (annotations span kernels, they are not work)
        "device_busy": sum(e.self_device_time_total for e in averages
                           if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e6,
        "aten_host": sum(e.self_cpu_time_total for e in host_events if e.key.startswith("aten::")) / 1e6,
        "ops": sum(e.count for e in host_events if e.key.startswith("aten::")),
        "regions_host": {e.key.split(":", 1)[1]: e.cpu_time_total / 1e6 for e in host_events
                         if e.key.startswith("region:")},
    }


@contextlib.contextmanager
def counted_syncs(device: str):
    """On a GPU, counts the host-device syncs made while active by their Python caller (a Counter of "file:line"):
    torch's sync debug mode warns at each synchronizing call (.item(), a blocking copy, nonzero, ...). The timed
    steps run without it. On a CPU there is nothing to count: yields None."""
    import warnings
    from collections import Counter

    import torch

    if device != "cuda":
        yield None
        return
    syncs: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default")
    syncs.update(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchronizing" in str(w.message))


def region_seconds(calls: dict, device: str) -> dict:
    """Seconds per region; nested calls (route_stashed inside end_mini_batch) are counted in their own region."""
    synchronize(device)
    if device == "cuda":
        return {name: sum(start.elapsed_time(end) for start, end in pairs) / 1000 for name, pairs in calls.items()}
    return {name: sum(end - start for start, end in pairs) for name, pairs in calls.items()}


def bench_config(model_dir: str, pair_file: str, args, rank, checkpointing: bool, device: str) -> dict:
    import gc

    import torch

    from verl_gq.verl.engine_driver import actor_loss_fn, actor_update, build_engine, make_batch

    micro_batch = args.micro_batch if checkpointing else args.micro_batch_no_ckpt
    gq = {"method": "route2b", "rank": rank, "refresh": 0, "pair_file": pair_file,
          "max_pair_tokens": 16384}
    started = time.perf_counter()
    engine = build_engine(model_dir, gq, remove_padding=False, checkpointing=checkpointing, micro_batch=micro_batch,
                          precision="bf16" if device == "cuda" else "fp32", lr=1e-6,
                          optimizer_overrides={"fused": True} if args.fused_adamw else None)
    build_seconds = time.perf_counter() - started
    select_arm = ArmSwitch(engine)
    controller = engine.route2b
    vocab = engine.model_config.hf_config.vocab_size
    data = make_batch(0, args.n, vocab, micro_batch, prompt_len=(args.prompt, args.prompt + 1),
                      response_len=(args.response, args.response + 1), remove_padding=False)
    loss_fn = actor_loss_fn(rollout_n=1, mini_batch=args.n)
    arms = ARMS + ((GATHER_ARM,) if args.gather_arm else ())
    times = {arm: [] for arm in arms}
    peaks = {arm: [] for arm in arms}
    knobs_stepped = {}
    for arm in arms:  # warm-up (allocator, kernels; route2b's first step extracts the direction)
        select_arm(arm)
        grads = actor_update(engine, data, loss_fn, read_grads=True)["grads"]
        # the knob tensors AdamW stepped: one (2, r) per module in every arm (the arms must differ only in routing)
        knobs_stepped[arm] = sum(rows["keep"] is not None for rows in grads.values())
    for _ in range(args.repeats):
        for arm in arms:
            select_arm(arm)
            elapsed, peak = timed_update(engine, data, loss_fn, device)
            times[arm].append(elapsed)
            peaks[arm].append(peak)
    regions = {}
    for arm in arms:  # one more step per arm, timed region by region
        select_arm(arm)
        with timed_regions(device) as calls:
            timed_update(engine, data, loss_fn, device)
        regions[arm] = region_seconds(calls, device)
    profiles = {}
    for arm in arms if args.profile else ():
        select_arm(arm)
        tag = f"r{rank}_ckpt{'on' if checkpointing else 'off'}_{arm}"
        profiles[arm] = profiled_step(engine, data, loss_fn, device, os.path.join(args.profile, f"{tag}.txt"))
    refresh = []
    for _ in range(args.refresh_repeats):
        synchronize(device)
        start = time.perf_counter()
        with engine.train_mode():
            controller.refresh()
        synchronize(device)
        refresh.append(time.perf_counter() - start)
    del engine, controller, select_arm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"rank": rank, "checkpointing": checkpointing, "micro_batch": micro_batch, "build_seconds": build_seconds,
            "times": times, "peaks": peaks, "regions": regions, "knobs_stepped": knobs_stepped,
            "profiles": profiles, "refresh": refresh}


def report(result: dict, refresh_every: int) -> None:
    times, peaks = result["times"], result["peaks"]
    base_t = statistics.median(times["vanilla"])
    base_m = max(peaks["vanilla"])
    print(f"\nrank={result['rank']} checkpointing={'on' if result['checkpointing'] else 'off'} "
          f"micro_batch={result['micro_batch']} (engine build {result['build_seconds']:.0f}s)")
    for arm in times:
        t = times[arm]
        ratio = statistics.median(t) / base_t
        spread = f"[{min(t) / base_t:.3f}, {max(t) / base_t:.3f}]"
        paired = [x / v for x, v in zip(t, times["vanilla"])]
        pairs = f"  paired x{statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]"
        memory = ""
        if peaks[arm][0] == peaks[arm][0]:  # not nan: a GPU run
            memory = f"  peak {max(peaks[arm]):6.2f} GiB  x{max(peaks[arm]) / base_m:.3f}"
        print(f"  {arm:14s} step {statistics.median(t):8.4f}s  x{ratio:.3f} vs vanilla  (min-max {spread})"
              f"{'' if arm == 'vanilla' else pairs}{memory}")
    regions = result.get("regions", {})  # runs before the regions were timed have none
    for arm, seconds in regions.items():
        parts = "  ".join(f"{name} {value * 1000:.1f}" for name, value in seconds.items())
        print(f"  {arm:14s} regions (ms): {parts}")
        if arm != "vanilla":
            own = sum(seconds.get(name, 0.0) for name in ROUTE2B_ONLY)
            shared = ""
            if "apply" in regions.get("vanilla", {}):  # (the earliest saved runs timed route2b's regions only)
                extra = sum(seconds[name] - regions["vanilla"][name] for name in ("apply", "optimizer"))
                shared = f"; apply + optimizer {extra * 1000:+.1f} ms against vanilla's"
            print(f"  {'':14s} route2b's own code {own * 1000:.1f} ms = {own / base_t * 100:.2f}% of vanilla's step"
                  f"{shared}")
    for arm, p in result.get("profiles", {}).items():
        region_host = "  ".join(f"{name} {value * 1000:.1f}" for name, value in p["regions_host"].items())
        syncs = "" if p.get("syncs") is None else f", {p['syncs']} host-device syncs"
        print(f"  {arm:14s} profiled: wall {p['wall']:.3f}s, device busy {p['device_busy']:.3f}s, host in {p['ops']} "
              f"ATen ops {p['aten_host']:.3f}s{syncs}; region host ms: {region_host}")
    if not result["refresh"]:
        return
    r = statistics.median(result["refresh"])
    print(f"  direction refresh {r:.3f}s = x{r / base_t:.3f} of a vanilla step; amortised at refresh={refresh_every}:"
          f" +{r / refresh_every / base_t * 100:.1f}% per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--ranks", help="comma-separated ints and/or 'full' (default 64,full GPU; 8 CPU)")
    parser.add_argument("--checkpointing", default="on,off", help="comma-separated on/off")
    parser.add_argument("--n", type=int, help="sequences per mini-batch (default 16 GPU, 8 CPU)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 1536 GPU, 24 CPU)")
    parser.add_argument("--response", type=int, help="response tokens (default 1536 GPU, 24 CPU)")
    parser.add_argument("--micro-batch", type=int, help="micro-batch with checkpointing (default 4)")
    parser.add_argument("--micro-batch-no-ckpt", type=int, help="micro-batch without checkpointing (default 4; 1 makes "
                        "the step host-bound: 16 micro-batches of one sequence)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refresh-repeats", type=int, help="default 2 GPU, 1 CPU; 0 skips the refresh")
    parser.add_argument("--pairs-per-mode", type=int, help="shipped pairs per mode for the direction (default: all "
                        "18 on GPU, 2 on CPU)")
    parser.add_argument("--refresh-every", type=int, default=5)
    parser.add_argument("--fused-adamw", action="store_true", help="every arm's AdamW fused (verl: actor.optim."
                        "override_optimizer_config={fused: true}, as recipes/vanilla.yaml and every paper arm set it) "
                        "instead of torch's default foreach")
    parser.add_argument("--gather-arm", action="store_true", help=f"also time {GATHER_ARM}: route2b stashing by the "
                        "per-position gather of packed batches, on the padded batch")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--profile", metavar="DIR", help="also run one step per arm under torch.profiler and write "
                        "its op tables to DIR")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved --json run and exit")
    args = parser.parse_args()
    if args.report:
        with open(args.report) as fh:
            saved = json.load(fh)
        print(f"{saved['args']['shape']} on {saved['device']}, saved run {args.report}")
        for result in saved["results"]:
            report(result, saved["args"]["refresh_every"])
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("VERL_PLATFORM", "cpu")
    big = device == "cuda"
    args.ranks = args.ranks or ("64,full" if big else "8")
    args.n = args.n or (16 if big else 8)
    args.prompt = args.prompt or (1536 if big else 24)
    args.response = args.response or (1536 if big else 24)
    args.micro_batch = args.micro_batch or 4
    args.pairs_per_mode = args.pairs_per_mode or (18 if big else 2)
    args.refresh_repeats = (2 if big else 1) if args.refresh_repeats is None else args.refresh_repeats
    args.micro_batch_no_ckpt = args.micro_batch_no_ckpt or 4

    from verl_gq.verl.engine_driver import init_process_group

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    init_process_group()
    ranks = [r if r == "full" else int(r) for r in args.ranks.split(",")]
    ckpts = [c == "on" for c in args.checkpointing.split(",")]
    print(f"{args.shape} on {device} ({torch.cuda.get_device_name() if big else os.cpu_count()} "
          f"{'' if big else 'cores'}), {args.n} x ({args.prompt} + {args.response}) tokens per mini-batch, "
          f"{args.repeats} alternating repeats, {args.pairs_per_mode} pairs per mode; torch {torch.__version__}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.shape, os.path.join(tmp, "model"), device)
        pair_file = write_pair_subset(args.pairs_per_mode, os.path.join(tmp, "pairs.jsonl"))
        for rank in ranks:
            for checkpointing in ckpts:
                result = bench_config(model_dir, pair_file, args, rank, checkpointing, device)
                report(result, args.refresh_every)
                results.append(result)
                if args.json:  # after every configuration: a run cut short keeps what it measured
                    with open(args.json, "w") as fh:
                        json.dump({"args": vars(args), "device": device, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
