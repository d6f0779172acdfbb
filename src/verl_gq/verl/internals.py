"""Every private name of verl that verl-gq relies on, in one place, checked when the plugin loads.

verl-gq extends verl 0.9.1 by its registries where verl has one and, where it has none, by subclassing verl's engine,
trainer and worker and overriding their protected methods, or by reading a private table. Those names are not
verl's public interface and may change in another release; `check_verl()` verifies each is there and fails with one
message naming verl's version and what is missing, instead of an AttributeError deep in a Ray worker. Code that
needs a private table takes it from here (`rollout_registry`, `engine_table`, `fsdp_logprob_module`).
"""

from __future__ import annotations

import importlib
from typing import Any

SUPPORTED_VERL = "0.9.1"

# (module, class or None, name): what the gq engine, trainer, worker and gap-fillers override, call or replace
PRIVATE_NAMES = (
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "_build_module"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "_build_optimizer"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "_build_model_optimizer"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead", "_get_packed_pad_size"),
    ("verl.workers.engine.fsdp.transformer_impl", None, "logprobs_from_logits"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_init_resource_pool_mgr"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_setup"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_validate"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_val_metrics_update"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_compute_metrics"),
    ("verl.trainer.ppo.v1.trainer_base", "PPOTrainer", "_save_checkpoint"),
    ("verl.workers.rollout.base", None, "_ROLLOUT_REGISTRY"),
    ("verl.workers.engine.base", "EngineRegistry", "_engines"),
    ("verl.utils.torch_functional", None, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE"),
    ("verl.utils.torch_functional", None, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE"),
)


class UnsupportedVerl(RuntimeError):
    """The installed verl lacks a private name verl-gq relies on."""


def check_verl() -> None:
    """Raise UnsupportedVerl naming every private name the installed verl lacks (nothing when all are there)."""
    import verl

    missing = []
    for module_name, owner, name in PRIVATE_NAMES:
        try:
            holder: Any = importlib.import_module(module_name)
            if owner is not None:
                holder = getattr(holder, owner)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{owner}" if owner else module_name)
            continue
        if not hasattr(holder, name):
            missing.append(f"{module_name}.{owner + '.' if owner else ''}{name}")
    if missing:
        version = getattr(verl, "__version__", "unknown")
        raise UnsupportedVerl(f"verl-gq {'supports' if version != SUPPORTED_VERL else 'needs'} verl {SUPPORTED_VERL}; "
                              f"the installed verl {version} lacks {missing}, which verl-gq overrides or reads "
                              "(verl_gq/verl/internals.py)")


def rollout_registry() -> dict:
    """verl's map of (rollout name, mode) to the rollout class path a worker builds (no public register function)."""
    from verl.workers.rollout import base

    return base._ROLLOUT_REGISTRY


def engine_table() -> dict:
    """EngineRegistry's table {model_type: {backend: {device: engine class}}} (no public lookup without building)."""
    from verl.workers.engine.base import EngineRegistry

    return EngineRegistry._engines


def fsdp_logprob_module() -> Any:
    """The module whose `logprobs_from_logits` verl's FSDP engine calls (the log-prob patch replaces it there)."""
    from verl.workers.engine.fsdp import transformer_impl

    return transformer_impl
