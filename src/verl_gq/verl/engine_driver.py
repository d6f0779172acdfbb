"""Drive the gq engine in one process, as verl's TrainingWorker does, on a verl-shaped actor mini-batch.

For the engine tests (tests/gq_engine_harness.py) and the actor-update benchmark (benchmarks/bench_routers.py):
both need verl's real FSDP engine, verl's ppo_loss and a mini-batch laid out as verl's V1 trainer hands it to
`update_actor` (nested jagged input_ids / position_ids / prompts / responses, per-token response fields, and the
non-tensor keys TrainingWorker adds), without Ray or a rollout.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group() -> None:
    """This process as rank RANK of WORLD_SIZE (default: a world of one) on gloo (CPU) or nccl (CUDA).

    Several ranks need MASTER_ADDR/MASTER_PORT in the environment (torchrun sets them)."""
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("VERL_PLATFORM") != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_method = "env://" if world_size > 1 else f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def build_engine(model_dir: str, gq: dict, *, remove_padding: bool, checkpointing: bool, micro_batch: int,
                 precision: str = "fp32", lr: float = 1e-2, strategy: str = "gq_fsdp2",
                 optimizer_overrides: Optional[dict] = None):
    """A gq engine over `model_dir`, configured as the recipes' actor is: `strategy` gq_fsdp2 (FSDP2) or gq_fsdp
    (FSDP1 with use_orig_params; verl wraps it with sync_module_states, which needs a GPU); `precision` fp32 or
    bf16 (verl's mixed precision: bf16 compute, fp32 parameters and reductions); `optimizer_overrides` as verl's
    `actor.optim.override_optimizer_config` (keyword arguments of the torch optimizer, e.g. {"fused": True})."""
    import verl_gq.verl.plugin  # noqa: F401  (registers the cpu platform and the gq engine)
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.base import EngineRegistry

    from verl_gq.verl.config import GQConfig, GQFSDPEngineConfig
    from verl_gq.verl.engine import GQ_STRATEGIES

    if strategy not in GQ_STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {sorted(GQ_STRATEGIES)}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: fp32 or bf16")
    model_config = HFModelConfig(
        path=model_dir,
        use_remove_padding=remove_padding,
        enable_gradient_checkpointing=checkpointing,
        override_config={"attn_implementation": "sdpa"},
    )
    engine_config = GQFSDPEngineConfig(
        strategy=GQ_STRATEGIES[strategy],
        use_orig_params=strategy == "gq_fsdp",
        use_torch_compile=False,
        mixed_precision={"param_dtype": "bf16" if precision == "bf16" else "fp32", "reduce_dtype": "fp32",
                         "buffer_dtype": "fp32"},
        gq=GQConfig(**gq),
    )
    # what FSDPActorConfig.__post_init__ and TrainingWorker do to the engine config
    object.__setattr__(engine_config, "strategy", strategy)
    engine_config.use_remove_padding = remove_padding
    engine_config.use_dynamic_bsz = False
    engine_config.micro_batch_size_per_gpu = micro_batch
    optimizer_config = FSDPOptimizerConfig(lr=lr, total_training_steps=10, clip_grad=1e9,
                                           override_optimizer_config=optimizer_overrides)
    engine = EngineRegistry.new(
        model_type="language_model",
        backend=strategy,
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    return engine


def actor_loss_fn(rollout_n: int, mini_batch: int):
    """verl's ppo_loss with an actor config of this mini-batch size (no KL term)."""
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    config = FSDPActorConfig(strategy="fsdp2", rollout_n=rollout_n, ppo_mini_batch_size=mini_batch,
                             ppo_micro_batch_size_per_gpu=mini_batch, use_kl_loss=False)
    return partial(ppo_loss, config=config)


def make_batch(seed: int, n: int, vocab: int, micro_batch: int, *, prompt_len: tuple[int, int] = (3, 7),
               response_len: tuple[int, int] = (2, 6), shared_good_response: bool = False,
               remove_padding: bool = True):
    """A verl-shaped actor mini-batch of `n` rollouts with random prompts and responses, lengths drawn uniformly
    from [lo, hi), and random advantages. With `shared_good_response`, every positive-advantage rollout has the
    same response (a behaviour the batch reinforces, which a planted direction can point at)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(n):
        p = int(torch.randint(*prompt_len, (1,), generator=g))
        r = int(torch.randint(*response_len, (1,), generator=g))
        prompts.append(torch.randint(3, vocab, (p,), generator=g))
        responses.append(torch.randint(3, vocab, (r,), generator=g))
    advantages = torch.randn(n, generator=g)
    if shared_good_response:
        good = torch.randint(3, vocab, (5,), generator=g)
        responses = [good.clone() if a > 0 else r for r, a in zip(responses, advantages)]
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses)]
    nested = partial(torch.nested.as_nested_tensor, layout=torch.jagged)
    resp_fields = {
        "response_mask": [torch.ones(len(r), dtype=torch.int64) for r in responses],
        "old_log_probs": [torch.zeros(len(r)) for r in responses],  # ratio = exp(logp): on-policy is not needed here
        "advantages": [torch.full((len(r),), float(a)) for r, a in zip(responses, advantages)],
    }
    data = TensorDict(
        {
            "input_ids": nested(seqs),
            "position_ids": nested([torch.arange(len(s)) for s in seqs]),
            "prompts": nested(prompts),
            "responses": nested(responses),
            "loss_mask": nested([torch.cat([torch.zeros(len(p)), torch.ones(len(r))]).long()
                                 for p, r in zip(prompts, responses)]),
            **{k: nested(v) for k, v in resp_fields.items()},
        },
        batch_size=n,
    )
    tu.assign_non_tensor(
        data,
        temperature=1.0,
        global_batch_size=n,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=micro_batch,
        max_token_len_per_gpu=max(4096, max(len(s) for s in seqs) * micro_batch),
        use_fused_kernels=False,
        calculate_entropy=False,
        use_remove_padding=remove_padding,
    )
    return data


def _unsharded(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _knob_columns(knobs: Optional[torch.Tensor], routers: list[str]) -> dict[str, Optional[list[float]]]:
    """{"effective": column 0, <router>: its quarantine column} of a module's (r, 1 + R) knobs or their gradient."""
    names = ["effective", *routers]
    if knobs is None:
        return dict.fromkeys(names)
    full = _unsharded(knobs).detach().double()
    return {name: full[:, column].tolist() for column, name in enumerate(names)}


def knob_grads(engine) -> dict[str, dict[str, Optional[list[float]]]]:
    """Every module's full (unsharded) knob gradients by column ({"effective": [...], <router>: [...]}); None where
    none."""
    routers = engine.adapter.quarantine_names
    return {name: _knob_columns(layer.knobs.grad, routers) for name, layer in engine.adapter.layers.items()}


def knob_values(engine) -> dict[str, dict[str, list[float]]]:
    """Every module's full (unsharded) knob values by column ({"effective": [...], <router>: [...]})."""
    routers = engine.adapter.quarantine_names
    return {name: _knob_columns(layer.knobs, routers) for name, layer in engine.adapter.layers.items()}


def actor_update(engine, data, loss_fn, *, step: bool = True, read_grads: bool = False) -> dict:
    """One mini-batch's forward/backward through the engine, as TrainingWorker.train_batch runs it, then (with
    `step`) the optimizer step. Returns the engine's gq/ metrics and, with `read_grads`, the knobs' gradients as
    they were before the step."""
    with engine.train_mode():
        engine.optimizer_zero_grad()
        output = engine.forward_backward_batch(data, loss_fn, forward_only=False)
        grads = knob_grads(engine) if read_grads else None
        if step:
            engine.optimizer_step()
    metrics = {k: float(v[0]) for k, v in output.get("metrics", {}).items() if k.startswith("gq/")}
    return {"grads": grads, "metrics": metrics}
