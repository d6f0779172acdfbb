"""Time of the hf rollout's generator against a plain decode loop, on the shipped organism, in one process.

    python benchmarks/bench_hf_rollout.py                                   # CUDA if present: float32 and bfloat16
    python benchmarks/bench_hf_rollout.py --device cpu --rows 16 --repeats 3
    python benchmarks/bench_hf_rollout.py --profile                         # plus the top operators of each variant

The default shape is one training step of the organism recipe: 256 rows (16 prompts x 16 samples) of random
225-token prompts (the organism's median prompt), 128 new tokens each (EOS ignored, so every row decodes all 128),
temperature 0.7, one batch. A deploy evaluation of 4096 samples: --rows 4096 --max-batch-rows 256 --variants
current. Variants, on separate copies of the model (verl_gq/organism/checkpoint):
  previous     a plain decode loop, the baseline: a dynamic KV cache,
               transformers' masks from a 2D padding mask every token, one shared torch.Generator, a host check of
               "all rows stopped" every token
  current      HFGenerator with the device's defaults (CUDA: graphs on; CPU: stopped rows leave the batch)
  eager        (CUDA only) HFGenerator with CUDA graphs off: what the graphs add
For each dtype it prints each variant's median seconds for all rows over the repeats (after one warm-up call
each, which also captures the CUDA graphs), the ratios previous/current (and eager/current), and two agreement
checks: greedy tokens of previous and current (the same argmax; a differing row is a near-tie of the two kernels'
logits, common in bfloat16), and the sampled tokens and log-probs of current and eager (the same keys: equal
unless the graph computes something else).
Speed claims come from this script's ratios, never from a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from verl_gq.models.hf_generator import HFGenerator, SamplingSpec

CHECKPOINT = Path(__file__).resolve().parent.parent / "src" / "verl_gq" / "organism" / "checkpoint"


@torch.inference_mode()
def previous_generate(model, prompts: list[list[int]], spec: SamplingSpec, eos_token_ids: tuple[int, ...],
                      pad_token_id: int, rng: torch.Generator) -> list[list[int]]:
    """A plain decode loop, without keyed sampling, a static cache or graphs (one sample per prompt)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    rows = prompts
    row_limits = torch.tensor([spec.max_tokens] * len(rows), device=device)
    batch, width = len(rows), max(len(p) for p in rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, prompt in enumerate(rows):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[i, width - len(prompt):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stop_ids = torch.tensor(
        sorted(set(spec.stop_token_ids) | (set() if spec.ignore_eos else set(eos_token_ids))) or [-1], device=device)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens_per_step, log_probs_per_step = [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(int(row_limits.max())):
        logits = out.logits[:, -1, :].float()
        if spec.temperature == 0:
            tokens = logits.argmax(dim=-1)
            log_probs = F.log_softmax(logits, dim=-1)
        else:
            log_probs = F.log_softmax(logits / spec.temperature, dim=-1)
            tokens = torch.multinomial(log_probs.exp(), 1, generator=rng)[:, 0]
        log_probs_per_step.append(log_probs.gather(-1, tokens[:, None])[:, 0])
        tokens = tokens.masked_fill(finished, pad_token_id)
        tokens_per_step.append(tokens)
        lengths += (~finished).long()
        finished |= (torch.isin(tokens, stop_ids) & ~finished) | (lengths >= row_limits)
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long, device=device)], 1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
    matrix = torch.stack(tokens_per_step, 1).tolist()
    torch.stack(log_probs_per_step, 1).tolist()  # the previous loop returned them too
    return [matrix[i][: int(lengths[i])] for i in range(batch)]


def organism_prompts(parquet: str, model: str, count: int) -> list[list[int]]:
    """The first `count` prompts of an organism parquet as token ids, as verl's agent loop builds them."""
    import pandas as pd
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = pd.read_parquet(parquet)["prompt"][:count]
    return [list(tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True)["input_ids"])
            for m in messages]


def timed(device: str, call) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call; on a shared CPU the CPU seconds
    are the steadier measure of work."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def profile_table(device: str, call, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        timed(device, call)
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default float32,bfloat16 on CUDA, "
                                                       "float32 on CPU")
    parser.add_argument("--variants", default=None, help="comma-separated subset of previous,current,eager")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-batch-rows", type=int, default=None,
                        help="decode the rows in consecutive batches of this size, as the server does with "
                             "max_batch_size (default: one batch)")
    parser.add_argument("--prompt-tokens", type=int, default=225)
    parser.add_argument("--prompts-from", default=None, metavar="PARQUET",
                        help="real prompts instead: the first rows/samples-per-prompt prompts of an organism parquet "
                             "(verl-gq data organism), chat template applied, EOS honoured")
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--model", default=str(CHECKPOINT))
    parser.add_argument("--profile", action="store_true", help="print the top operators of one call per variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = (args.dtypes or ("float32,bfloat16" if args.device == "cuda" else "float32")).split(",")
    names = (args.variants or ("previous,current,eager" if args.device == "cuda" else "previous,current")).split(",")
    unknown = set(names) - {"previous", "current", "eager"}
    if unknown or ("eager" in names and args.device != "cuda"):
        parser.error(f"--variants: choose from previous, current and (CUDA only) eager; got {args.variants}")

    if args.prompts_from:
        prompts = organism_prompts(args.prompts_from, args.model, args.rows // args.samples_per_prompt)
        prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
        shape = (f"{len(prompts)} rows = {len(prompts) // args.samples_per_prompt} prompts of "
                 f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens x {args.samples_per_prompt} samples, up "
                 f"to {args.new_tokens} new tokens (EOS honoured)")
    else:
        generator = torch.Generator().manual_seed(0)
        vocab_size = HFGenerator.from_pretrained(args.model, dtype="float32", device="cpu").vocab_size
        prompts = [torch.randint(4, vocab_size, (args.prompt_tokens,), generator=generator).tolist()
                   for _ in range(args.rows)]
        shape = f"{args.rows} rows x {args.prompt_tokens} random prompt tokens + {args.new_tokens} new tokens"
    batch_rows = args.max_batch_rows or len(prompts)
    batches = [prompts[start:start + batch_rows] for start in range(0, len(prompts), batch_rows)]
    ignore_eos = not args.prompts_from
    spec = SamplingSpec(max_tokens=args.new_tokens, temperature=args.temperature, ignore_eos=ignore_eos)
    greedy = SamplingSpec(max_tokens=args.new_tokens, temperature=0, ignore_eos=ignore_eos)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}; {shape}, "
          f"{len(batches)} batches, T={args.temperature}, {args.repeats} repeats")
    if args.device == "cuda":  # which attention kernels sdpa may pick (cuDNN's are planned per shape)
        backends = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                    "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                    "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
        print(f"sdpa backends enabled: {', '.join(name for name, on in backends.items() if on)}")

    for dtype in dtypes:
        variants = {}  # name -> (spec -> [(token ids, log-probs) per row])
        if "previous" in names:
            previous = HFGenerator.from_pretrained(args.model, dtype=dtype, device=args.device, cuda_graphs=False)
            previous.model.set_attn_implementation("sdpa")  # the previous loop ran transformers' own sdpa attention
            rng = torch.Generator(device=args.device).manual_seed(0)
            variants["previous"] = lambda s, g=previous, rng=rng: [
                (tokens, None) for batch in batches
                for tokens in previous_generate(g.model, batch, s, g.eos_token_ids, g.pad_token_id, rng)]
        for name, options in (("current", {}), ("eager", {"cuda_graphs": False})):
            if name in names:
                model = HFGenerator.from_pretrained(args.model, dtype=dtype, device=args.device, **options)
                variants[name] = lambda s, g=model: [(r.token_ids, r.log_probs) for batch in batches
                                                     for [r] in g.generate(batch, s)]

        first = {name: timed(args.device, lambda: call(spec))[0] for name, call in variants.items()}  # + capture
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu_seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, call in variants.items():
                wall, cpu = timed(args.device, lambda: call(spec))
                seconds[name].append(wall)
                cpu_seconds[name].append(cpu)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        cpu_medians = {name: statistics.median(values) for name, values in cpu_seconds.items()}
        print(f"\n{dtype}")
        for name in variants:
            print(f"  {name:9s} median {medians[name]:7.3f} s  (min {min(seconds[name]):.3f}, max "
                  f"{max(seconds[name]):.3f}; first call {first[name]:.3f}; CPU {cpu_medians[name]:.3f} s)  "
                  f"{len(prompts) / medians[name]:8.0f} rows/s")
        for reference in ("previous", "eager"):
            for name in variants:
                if reference in variants and name not in (reference, "previous"):
                    print(f"  {reference} / {name}: x{medians[reference] / medians[name]:.2f} wall, "
                          f"x{cpu_medians[reference] / cpu_medians[name]:.2f} CPU time")

        if "previous" in variants and "current" in variants:
            pairs = zip(variants["previous"](greedy), variants["current"](greedy))
            same = sum(a[0] == b[0] for a, b in pairs)
            print(f"  greedy tokens, previous vs current: {same}/{len(prompts)} rows identical")
        if "current" in variants and "eager" in variants:
            pairs = list(zip(variants["current"](spec), variants["eager"](spec)))
            same = sum(a[0] == b[0] for a, b in pairs)
            gap = max(max((abs(x - y) for x, y in zip(a[1], b[1])), default=0.0) for a, b in pairs)
            print(f"  sampled tokens, current vs eager: {same}/{len(prompts)} rows identical, largest log-prob "
                  f"difference {gap:.2e}")
        if args.profile:
            for name, call in variants.items():
                print(f"\n  profile of one call, {name} ({dtype}):")
                print(profile_table(args.device, lambda: call(spec)))


if __name__ == "__main__":
    main()
