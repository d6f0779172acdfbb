"""Every registration verl-gq makes with verl, in one place.

verl imports this module through the `verl.plugins` entry point (pyproject.toml) in every process that imports
verl: the Hydra driver, the TaskRunner and every Ray worker (verl/__init__.py:55-76). verl swallows entry-point
errors at DEBUG level (verl/__init__.py:76), so a failure here prints its traceback to stderr before re-raising:
a broken plugin must never fail silently. A failed import leaves no module behind, so code that verl reaches by
path (the recipe search-path plugin, verl-gq's reward entry) imports this module too: a broken plugin then stops
the run there with the same traceback, instead of a confusing "Unknown backend" later.

Registrations:
- platform "cpu" (PlatformRegistry; active only with VERL_PLATFORM=cpu), verl's FSDP engines for device "cpu",
  and, under VERL_PLATFORM=cpu, the gloo backend-string fix (verl_gq.verl.platform_cpu);
- rollout backend "hf": the replica (RolloutReplicaRegistry) and the trainer-side server adapter
  (_ROLLOUT_REGISTRY[("hf", "async")]) (verl_gq.verl.hf_rollout);
- training engine "gq_fsdp2" / "gq_fsdp" (EngineRegistry, devices cuda/npu/cpu): the quarantine adapter and
  route2b's gated backward (verl_gq.verl.engine), selected with actor_rollout_ref.actor.strategy;
- trainer "gq_sync" (verl's TRAINER_REGISTRY): deploy evaluation with the quarantine off and per-mode reward
  metrics (verl_gq.verl.trainer), selected with trainer.v1.trainer_mode;
- the OmegaConf resolver `${gq_pkg:<package>/<path>}` of the recipes (verl_gq.resolvers).
"""

import sys
import traceback


def _register() -> None:
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    # ${gq_pkg:...} in recipes (the organism's model path): resolved in whichever process resolves the config
    from verl_gq import resolvers

    resolvers.register()

    # the platform first: the other modules import verl code that may ask which platform this is
    from verl_gq.verl import platform_cpu

    # CPU platform: the class registers itself as "cpu" when platform_cpu is imported (a PlatformRegistry decorator).
    platform_cpu.register_cpu_engines()
    if platform_cpu.cpu_platform_selected():
        platform_cpu.install_gloo_backend_fix()

    from verl_gq.verl import engine, hf_rollout, trainer  # noqa: F401  (trainer: @register_trainer("gq_sync"))

    # gq training engine (the trainer registered itself on import)
    engine.register_engines()

    # HF rollout backend
    RolloutReplicaRegistry.register(hf_rollout.ROLLOUT_NAME, lambda: hf_rollout.HFReplica)
    rollout_base._ROLLOUT_REGISTRY[(hf_rollout.ROLLOUT_NAME, "async")] = (
        f"{hf_rollout.HFServerAdapter.__module__}.{hf_rollout.HFServerAdapter.__name__}"
    )


try:
    _register()
except Exception:  # noqa: BLE001 - re-raised below, after making the failure visible
    print("verl-gq: the verl plugin failed to import; verl would hide this error:", file=sys.stderr)
    traceback.print_exc()
    raise
