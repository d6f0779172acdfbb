"""Cost of the one-backward knob-gradient capture against the vanilla backward and per-sample autograd.

Runs on a tiny random Qwen2 in one process and prints median times and ratios (not absolute claims):
  plain       forward + backward, keep knob gets the gradient (the vanilla arm)
  stash       forward + backward stashing per-rollout gradients (route2b, rollout granularity): padded batch rows,
              the broadcast stash
  gather      the same by the per-position gather, as packed (remove-padding) batches stash per rollout
  stash+tok   the same plus the per-token stash of response positions (route2b, token granularity)
  per-sample  forward once, then one autograd.grad per rollout (the naive way to get the same numbers)

    python benchmarks/bench_capture.py --batch 8 --seq 64 --rank 16 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_gq.adapter import QuarantineAdapterConfig, inject_quarantine_adapter
from verl_gq.routing import KnobGradientCapture, Segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = Qwen2Config(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * args.seq,
    )
    model = Qwen2ForCausalLM(config).eval()
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=args.rank))
    input_ids = torch.randint(0, 256, (args.batch, args.seq))
    response_mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    response_mask[:, args.seq // 2 :] = True
    advantages = torch.randn(args.batch)

    def rollout_losses() -> torch.Tensor:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        log_probs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        return -(advantages[:, None] * log_probs * response_mask[:, 1:]).sum(1) / response_mask.sum()

    def plain() -> None:
        with KnobGradientCapture(adapter, mode="plain"):
            rollout_losses().sum().backward()
        for p in adapter.knob_parameters():
            p.grad = None

    everywhere = torch.ones(args.batch, args.seq, dtype=torch.bool)

    def stash(per_token: bool, gather: bool = False) -> None:
        capture = KnobGradientCapture(adapter, mode="stash")
        with capture:
            capture.set_segments(Segments.padded(args.batch, args.seq, position_mask=everywhere if gather else None,
                                                 token_mask=response_mask if per_token else None))
            rollout_losses().sum().backward()
        capture.per_example_gradients()

    def per_sample() -> None:
        losses = rollout_losses()
        for i in range(args.batch):
            torch.autograd.grad(losses[i], adapter.knob_parameters(), retain_graph=i < args.batch - 1)

    runs = {"plain": plain, "stash": lambda: stash(False), "gather": lambda: stash(False, gather=True),
            "stash+tok": lambda: stash(True), "per-sample": per_sample}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved so machine load hits every variant alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"tiny Qwen2: batch {args.batch} x seq {args.seq}, hidden {args.hidden}, {args.layers} layers, "
          f"{len(adapter.layers)} modules at rank {args.rank}, {args.threads} thread(s), {args.repeats} repeats")
    for name, value in median.items():
        print(f"  {name:<11} median {value * 1e3:8.2f} ms   x{value / median['plain']:.2f} of plain")
    print(f"  per-sample / stash = {median['per-sample'] / median['stash']:.2f}")


if __name__ == "__main__":
    main()
