"""Every registration verl-gq makes with verl, in one place.

verl imports this module through the `verl.plugins` entry point (pyproject.toml) in every process that imports
verl: the Hydra driver, the TaskRunner and every Ray worker (verl/__init__.py:55-76). verl swallows entry-point
errors at DEBUG level (verl/__init__.py:76), so a failure here prints its traceback to stderr before re-raising:
a broken plugin must never fail silently. A failed import leaves no module behind, so code that verl reaches by
path (the recipe search-path plugin, verl-gq's reward entry) imports this module too: a broken plugin then stops
the run there with the same traceback, instead of a confusing "Unknown backend" later.

Registrations, each made below in one place:
- the installed verl is checked for every private name verl-gq relies on (verl_gq.verl.internals);
- the OmegaConf resolver `${gq_pkg:<package>/<path>}` of the recipes (verl_gq.resolvers);
- platform "cpu" (PlatformRegistry; active only with VERL_PLATFORM=cpu), verl's FSDP engines for device "cpu", and,
  under VERL_PLATFORM=cpu, the gloo backend-string fix (verl_gq.verl.gapfill.platform_cpu);
- rollout backend "hf": the replica (RolloutReplicaRegistry) and the trainer-side server adapter
  (verl's rollout registry) (verl_gq.verl.gapfill.hf_rollout);
- training engine "gq_fsdp2" / "gq_fsdp" (EngineRegistry, devices cuda/npu/cpu): the quarantine adapter and the
  routers' gated backward (verl_gq.verl.engine), selected with actor_rollout_ref.actor.strategy;
- trainer "gq_sync" (verl's trainer registry): every view's deploy evaluation and per-mode reward metrics
  (verl_gq.verl.trainer), selected with trainer.v1.trainer_mode.
"""

import sys
import traceback


def _register() -> None:
    from verl.plugin.platform.platform_manager import PlatformRegistry

    # the platform first: verl's engine, trainer and worker modules ask which platform this is when imported
    from verl_gq.verl.gapfill import platform_cpu

    PlatformRegistry.register(platform=platform_cpu.PLATFORM_NAME)(platform_cpu.PlatformCPU)

    from verl_gq.verl import internals

    internals.check_verl()

    from verl_gq import resolvers

    resolvers.register()

    platform_cpu.register_cpu_engines()
    if platform_cpu.cpu_platform_selected():
        platform_cpu.install_gloo_backend_fix()

    from verl.trainer.ppo.v1.trainer_base import register_trainer
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_gq.verl import engine, trainer
    from verl_gq.verl.gapfill import hf_rollout

    engine.register_engines()
    register_trainer(trainer.TRAINER_MODE)(trainer.GQTrainer)
    RolloutReplicaRegistry.register(hf_rollout.ROLLOUT_NAME, lambda: hf_rollout.HFReplica)
    internals.rollout_registry()[(hf_rollout.ROLLOUT_NAME, "async")] = (
        f"{hf_rollout.HFServerAdapter.__module__}.{hf_rollout.HFServerAdapter.__name__}"
    )


try:
    _register()
except Exception:  # noqa: BLE001 - re-raised below, after making the failure visible
    print("verl-gq: the verl plugin failed to import; verl would hide this error:", file=sys.stderr)
    traceback.print_exc()
    raise
