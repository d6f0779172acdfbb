"""The `gq` config block, and the engine config that carries it to the training engine.

verl builds `actor_rollout_ref.actor.fsdp_config` into a dataclass through its `_target_` and hands that object
to the engine as `engine_config`. Swapping the `_target_` to `GQFSDPEngineConfig` is how the `gq` block reaches
the engine without editing verl (verl-0.9.1-map.md section 7). Every field is validated here, at config time, with
an error that names the field: a misspelt mode or an impossible band must not surface as a NaN three hours in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from verl.base_config import BaseConfig
from verl.workers.config import FSDPEngineConfig

from verl_gq.adapter.config import AdapterConfigError, QuarantineAdapterConfig
from verl_gq.routing.controller import RouterSpec, RouterSpecError, check_routers
from verl_gq.routing.optimizer import OPTIMIZERS

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GQConfigError(ValueError):
    """A `gq` config value that cannot work; the message names the field."""


@dataclass
class GQConfig(BaseConfig):
    """Options of the quarantine adapter, the routers and the knobs' optimizer.

    rank: SVD rank r of each adapted module, an int or "full".
    target_modules: module-name patterns to adapt (default: all attention and MLP projections).
    routers: {name: router fields} (verl_gq.routing.RouterSpec: granularity, direction, direction_modes,
        direction_rank, refresh, band, clean_quantile, hack_quantile, calibration_folds, frout_target, match, seed).
        Each router gets its own quarantine knob; empty (the default) is vanilla: the adapter trains with no
        quarantine. A mapping, so that an overlay recipe can change one router's field (or drop it with null).
    router_defaults: router fields every router takes unless it sets its own (a setting's recipe, e.g. the
        organism's, sets them once for whatever routers a run has).
    pair_file: jsonl of (mode, prompt, clean, hack) pairs the routers' directions and bands come from.
    max_pair_tokens: pairs longer than this (prompt + completion) are an error, not silently cut.
    seed: seed of the pair folds and the Haar directions of routers that set none.
    optimizer: conserving_adamw (the knobs train exactly as vanilla's, whatever is routed) | per_row_adamw (the
        ablation that normalises kept and quarantine knobs separately; confounded, see verl_gq/routing/optimizer.py).
    run_dir: where run artifacts are written (train.safetensors, metrics.jsonl, per_mode_deploy.json); empty = none.
    """

    _target_: str = "verl_gq.verl.config.GQConfig"
    rank: Any = 64  # int or "full" (Any: OmegaConf structured configs cannot hold Union[int, str])
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    routers: dict[str, Any] = field(default_factory=dict)
    router_defaults: dict[str, Any] = field(default_factory=dict)
    pair_file: str = ""
    max_pair_tokens: int = 4096
    seed: int = 0
    optimizer: str = "conserving_adamw"
    run_dir: str = ""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> GQConfigError:
            return GQConfigError(f"gq.{name}={getattr(self, name)!r}: {why}")

        if not (self.rank == "full" or (isinstance(self.rank, int) and not isinstance(self.rank, bool)
                                        and self.rank > 0)):
            raise bad("rank", 'must be a positive int or "full"')
        if not self.target_modules:
            raise bad("target_modules", "must name at least one module pattern")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {list(OPTIMIZERS)}")
        specs = router_specs(self.routers, self.router_defaults)
        object.__setattr__(self, "router_defaults", dict(self.router_defaults or {}))
        object.__setattr__(self, "routers", {spec.name: spec for spec in specs})
        if self.optimizer == "per_row_adamw" and len(specs) != 1:
            raise bad("optimizer", f"per_row_adamw updates a kept and one quarantine knob: it needs exactly one router "
                      f"(got {len(specs)})")
        if any(spec.needs_direction for spec in specs) and not self.pair_file:
            raise bad("pair_file", "routers with a direction need a pair file")

    @property
    def router_specs(self) -> list[RouterSpec]:
        """The routers in quarantine-column order."""
        return list(self.routers.values())

    @classmethod
    def from_any(cls, value: Any) -> "GQConfig":
        """A GQConfig from itself, a dict or a DictConfig (what Hydra hands over without a `_target_`)."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        data = dict(value)
        data.pop("_target_", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GQConfigError(f"unknown gq keys {unknown}; known: {sorted(known - {'_target_'})}")
        if "target_modules" in data:
            data["target_modules"] = list(data["target_modules"])
        return cls(**data)


def router_specs(routers: Any, defaults: Any = None) -> list[RouterSpec]:
    """`gq.routers` ({name: fields}, a null entry dropped; `defaults` under each router's own fields) as checked
    RouterSpecs, in the mapping's order."""
    known = {f.name for f in fields(RouterSpec)} - {"name"}
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise GQConfigError(f"gq.router_defaults: unknown keys {unknown}; known: {sorted(known)}")
    if routers is None:
        return []
    if isinstance(routers, RouterSpec):
        routers = {routers.name: routers}
    if not hasattr(routers, "items"):
        raise GQConfigError(f"gq.routers must map router names to their fields, got {type(routers).__name__}")
    specs = []
    for name, spec in routers.items():
        if spec is None:
            continue
        if isinstance(spec, RouterSpec):
            specs.append(spec)
            continue
        if not hasattr(spec, "items"):
            raise GQConfigError(f"gq.routers.{name} must be a mapping of router fields, got {spec!r}")
        data = {str(k): (list(v) if k == "direction_modes" else v) for k, v in {**defaults, **dict(spec)}.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GQConfigError(f"gq.routers.{name}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            specs.append(RouterSpec(name=str(name), **data))
        except (RouterSpecError, TypeError) as error:
            raise GQConfigError(f"gq.routers.{name}: {error}") from None
    from reward.modes import MODES

    for spec in specs:
        unknown = [m for m in spec.direction_modes if m not in MODES]
        if unknown:
            raise GQConfigError(f"gq.routers.{spec.name}.direction_modes: unknown modes {unknown}; known: {list(MODES)}")
    try:
        check_routers(specs)
        QuarantineAdapterConfig(quarantines=[spec.name for spec in specs])
    except (RouterSpecError, AdapterConfigError) as error:
        raise GQConfigError(f"gq.routers: {error}") from None
    return specs


@dataclass
class GQFSDPEngineConfig(FSDPEngineConfig):
    """verl's FSDP engine config plus the `gq` block (selected with fsdp_config._target_)."""

    gq: GQConfig = field(default_factory=GQConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "gq", GQConfig.from_any(self.gq))
