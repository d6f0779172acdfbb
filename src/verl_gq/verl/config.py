"""The `gq` config block, the engine config that carries it to the training engine, and the actor config that
checks a gq run on the driver.

verl builds `actor_rollout_ref.actor.fsdp_config` into a dataclass through its `_target_` and hands that object
to the engine as `engine_config`. Swapping the `_target_` to `GQFSDPEngineConfig` is how the `gq` block reaches
the engine without editing verl; swapping `actor._target_` to `GQActorConfig` runs the run's checks where verl
validates the actor config, on the driver before Ray starts. Every field is validated with an error that names the
field: a misspelt mode or an impossible band must not surface as a NaN three hours in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from verl.base_config import BaseConfig
from verl.workers.config import FSDPActorConfig, FSDPEngineConfig

from verl_gq.adapter.config import AdapterConfigError, QuarantineAdapterConfig
from verl_gq.monitor.config import MonitorSpec
from verl_gq.routing.controller import MIN_PAIRS, RouterSpec, RouterSpecError, check_routers
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
    final_eval_file: the last deploy evaluation's prompts (a verl parquet like data.val_files), so that the periodic
        evaluations can stay small (curves) and the last one large (the tables); empty = data.val_files.
    final_eval_n: samples per prompt in the last evaluation; 0 = actor_rollout_ref.rollout.val_kwargs.n.
    monitor: a monitor and the intervention acting on its flags (verl_gq.monitor.MonitorSpec: kind probe |
        gt_labels, intervention penalty | screening, ...); empty (the default): none. Not an arm of a routers run:
        it changes what the run trains on.
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
    final_eval_file: str = ""
    final_eval_n: int = 0
    monitor: dict[str, Any] = field(default_factory=dict)

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
        if isinstance(self.final_eval_n, bool) or not isinstance(self.final_eval_n, int) or self.final_eval_n < 0:
            raise bad("final_eval_n", "must be an int >= 0 (0: the evaluations' val_kwargs.n)")
        specs = router_specs(self.routers, self.router_defaults)
        object.__setattr__(self, "router_defaults", dict(self.router_defaults or {}))
        object.__setattr__(self, "routers", {spec.name: spec for spec in specs})
        if self.optimizer == "per_row_adamw" and len(specs) != 1:
            raise bad("optimizer", f"per_row_adamw updates a kept and one quarantine knob: it needs exactly one router "
                      f"(got {len(specs)})")
        if any(spec.needs_direction for spec in specs) and not self.pair_file:
            raise bad("pair_file", "routers with a direction need a pair file")
        try:
            monitor = MonitorSpec.from_any(self.monitor)
        except ValueError as error:
            raise GQConfigError(str(error)) from None
        object.__setattr__(self, "monitor", dict(self.monitor or {}))
        if monitor is not None and specs:
            raise bad("monitor", f"a monitor changes what the run trains on, so its run is an arm of its own: drop "
                      f"the routers {[s.name for s in specs]} (routers ride runs that train as vanilla)")
        if monitor is not None and monitor.kind == "probe" and not self.pair_file:
            raise bad("pair_file", "the probe monitor is trained on a pair file")

    @property
    def monitor_spec(self):
        """The monitor (verl_gq.monitor.MonitorSpec), or None."""
        return MonitorSpec.from_any(self.monitor)

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


@dataclass
class GQActorConfig(FSDPActorConfig):
    """verl's FSDP actor config plus the gq engine's checks of the whole run (selected with actor._target_).

    verl's main_ppo validates the actor config on the driver before Ray starts (verl/utils/config.py,
    `validate_config` -> `actor_config.validate(n_gpus, train_batch_size, model_config)`), so what a gq run cannot
    use fails here in seconds, not after the workers have built the model: the pair file (every line, every router's
    modes), the adapter's rank and target modules against the model's own config, the pairs' token lengths, and verl
    options the gq engine cannot honour."""

    def validate(self, n_gpus: int, train_batch_size: int, model_config: dict = None):
        super().validate(n_gpus, train_batch_size, model_config)
        gq = getattr(self.fsdp_config, "gq", None)
        if gq is None:
            raise GQConfigError("actor_rollout_ref.actor._target_ is GQActorConfig but fsdp_config has no `gq` block: "
                                "set actor_rollout_ref.actor.fsdp_config._target_=verl_gq.verl.config.GQFSDPEngineConfig")
        if self.strategy not in ("gq_fsdp2", "gq_fsdp"):
            raise GQConfigError(f"actor_rollout_ref.actor.strategy={self.strategy!r}: a gq run trains through the gq "
                                "engine, strategy gq_fsdp2 (or gq_fsdp)")
        check_run(gq, model_config, ulysses=self.ulysses_sequence_parallel_size)


def check_run(gq: GQConfig, model_config: Any, ulysses: int = 1) -> None:
    """The checks of GQActorConfig.validate (see there) on a gq block and verl's model config."""
    from reward.modes import MODES
    from reward.pairs import PairFileError, read_pairs

    from verl_gq.verl.pairs import resolve_pair_file

    model = dict(model_config or {})
    if gq.final_eval_file and not Path(gq.final_eval_file).is_file():
        raise GQConfigError(f"gq.final_eval_file={gq.final_eval_file!r}: no such file (the organism's is written by "
                            "`verl-gq data organism` as test_final.parquet)")
    if int(model.get("lora_rank") or 0) > 0:
        raise GQConfigError(f"actor_rollout_ref.model.lora_rank={model['lora_rank']}: the gq engine's SVD adapter "
                            "takes LoRA's place (its merged-weight stream carries the knobs); set lora_rank=0")
    if gq.routers and ulysses > 1:
        raise GQConfigError(f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={ulysses}: routers need each "
                            "rollout's positions on one rank (its gradient is summed before gating); use 1")
    directed = [spec for spec in gq.router_specs if spec.needs_direction]
    monitor = gq.monitor_spec
    probe = monitor is not None and monitor.kind == "probe"
    pairs = []
    if directed or probe:
        try:
            pairs = read_pairs(resolve_pair_file(gq.pair_file))
        except (PairFileError, FileNotFoundError) as error:
            raise GQConfigError(f"gq.pair_file: {error}") from None
    for spec in directed:
        modes = set(spec.direction_modes)
        count = sum(1 for pair in pairs if not modes or pair.mode in modes)
        if count < MIN_PAIRS:
            raise GQConfigError(f"gq.routers.{spec.name}: {gq.pair_file} has {count} pairs of modes "
                                f"{sorted(modes) or 'all'}; its direction and band need at least {MIN_PAIRS}")
    if probe:
        unknown = sorted(set(monitor.modes) - set(MODES))
        if unknown:
            raise GQConfigError(f"gq.monitor.modes: unknown modes {unknown}; known: {list(MODES)}")
        count = sum(1 for pair in pairs if not monitor.modes or pair.mode in monitor.modes)
        if count < MIN_PAIRS:
            raise GQConfigError(f"gq.monitor: {gq.pair_file} has {count} pairs of modes {list(monitor.modes) or 'all'}; "
                                f"the probe's fit and held-out threshold need at least {MIN_PAIRS}")
    path = model.get("path")
    if path and Path(str(path)).is_dir():  # a hub name is checked by the engine once the model is fetched
        check_model(gq, Path(str(path)), pairs if directed else [])


def check_model(gq: GQConfig, model_dir: Path, pairs: list) -> None:
    """The adapter's rank and target modules on the model's config (built on the meta device: nothing allocated,
    the engine's own injection code names the module that does not fit), and every pair's token length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from verl_gq.adapter.model import inject_quarantine_adapter
    from verl_gq.routing.pair_tokens import tokenize_pairs

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=gq.rank, target_modules=list(gq.target_modules),
                                                                 quarantines=list(gq.routers)))
    except AdapterConfigError as error:
        raise GQConfigError(f"gq.rank / gq.target_modules on {model_dir}: {error}") from None
    if pairs:
        try:
            tokenize_pairs(pairs, AutoTokenizer.from_pretrained(model_dir), gq.max_pair_tokens)
        except ValueError as error:
            raise GQConfigError(f"gq.pair_file={gq.pair_file}: {error}") from None
