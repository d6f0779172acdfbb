"""Versioned schemas of the run artifacts: `per_mode_deploy.json` and the rows of `metrics.jsonl`.

Every record carries `schema_version`. A reader accepts only the versions it knows and rejects a record with a
missing, unknown or ill-typed field, or numbers that contradict each other, with a `SchemaError` that names the
file, the line where there is one, and the field path (e.g. `deployed.by_mode.sentinel.n`). Records are parsed
from JSON text in pydantic's strict mode: `1` is not `true`, `"0.5"` is not a number, NaN is not a rate.

Rates are fractions of graded samples: `hack` = exploited the mode's channel AND failed the strict oracle,
`solve` = passed the strict oracle. They are exclusive per sample, so hack + solve <= 1, and rate * n is a whole
count. A block's `overall` is the pooled count over its `by_mode` entries, which the schema checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from reward.modes import ALL_MODES

# Version 2: a run carries routers; each router has its deployed view, the run one as-trained view. Version 1 (one
# arm per run: `arm`, `deployed`, `as_trained`) is still read, converted to version 2 (`legacy_arm` records the arm).
DEPLOY_SCHEMA_VERSION = 2
METRICS_SCHEMA_VERSION = 2
SUPPORTED_DEPLOY_VERSIONS = frozenset({1, DEPLOY_SCHEMA_VERSION})
SUPPORTED_METRICS_VERSIONS = frozenset({1, METRICS_SCHEMA_VERSION})

# How far rate * n may sit from a whole count: rates are written as count / n in float64.
_COUNT_TOLERANCE = 1e-6

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SchemaError(ValueError):
    """An artifact that does not match its schema; the message names the file, line and field."""


def _whole_count(rate: float, n: int) -> int:
    count = rate * n
    if abs(count - round(count)) > _COUNT_TOLERANCE:
        raise ValueError(f"rate {rate!r} times n={n} is {count!r}, not a whole count of samples")
    return round(count)


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class ModeStats:
    """Hack and solve rates over `n` graded samples; both are null exactly when n == 0."""

    hack: Optional[float] = Field(ge=0.0, le=1.0)
    solve: Optional[float] = Field(ge=0.0, le=1.0)
    n: int = Field(ge=0)

    @model_validator(mode="after")
    def _rates_agree_with_n(self) -> "ModeStats":
        if self.n == 0:
            if self.hack is not None or self.solve is not None:
                raise ValueError("n == 0 needs hack and solve null (no samples, no rate)")
            return self
        if self.hack is None or self.solve is None:
            raise ValueError(f"n == {self.n} needs numeric hack and solve")
        if self.hack_count + self.solve_count > self.n:
            raise ValueError(f"hack + solve = {self.hack + self.solve!r} > 1: a hack is by definition not a solve")
        return self

    @property
    def hack_count(self) -> int:
        return 0 if self.n == 0 else _whole_count(self.hack, self.n)

    @property
    def solve_count(self) -> int:
        return 0 if self.n == 0 else _whole_count(self.solve, self.n)

    @classmethod
    def from_counts(cls, hack: int, solve: int, n: int) -> "ModeStats":
        if n == 0:
            return cls(hack=None, solve=None, n=0)
        return cls(hack=hack / n, solve=solve / n, n=n)


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class EvalBlock:
    """Hack/solve overall and per loophole mode; `overall` is the pooled count of `by_mode`."""

    overall: ModeStats
    by_mode: dict[str, ModeStats]

    @model_validator(mode="after")
    def _overall_pools_by_mode(self) -> "EvalBlock":
        unknown = sorted(set(self.by_mode) - set(ALL_MODES))
        if unknown:
            raise ValueError(f"by_mode has unknown modes {unknown}; known: {list(ALL_MODES)}")
        pooled = (sum(s.hack_count for s in self.by_mode.values()),
                  sum(s.solve_count for s in self.by_mode.values()),
                  sum(s.n for s in self.by_mode.values()))
        own = (self.overall.hack_count, self.overall.solve_count, self.overall.n)
        if own != pooled:
            raise ValueError(f"overall (hack, solve, n) counts {own} must equal the sum over by_mode {pooled}")
        return self

    @classmethod
    def from_samples(cls, modes: Sequence[str], solved: Sequence[bool], hacked: Sequence[bool],
                     eval_modes: Sequence[str]) -> "EvalBlock":
        """Pool per-sample verdicts (the reward's `mode`, `gt_pass`, `exploited`) into rates.

        Every mode in `eval_modes` gets an entry (n = 0 when no sample carried it); a sample of any other mode is
        an error, as is a sample both solved and hacked.
        """
        if not len(modes) == len(solved) == len(hacked):
            raise ValueError(f"modes, solved, hacked must have one entry per sample; "
                             f"got {len(modes)}, {len(solved)}, {len(hacked)}")
        counts = {mode: [0, 0, 0] for mode in eval_modes}
        for i, (mode, solve, hack) in enumerate(zip(modes, solved, hacked)):
            if mode not in counts:
                raise ValueError(f"sample {i} has mode {mode!r}, not one of eval_modes {list(eval_modes)}")
            if solve and hack:
                raise ValueError(f"sample {i} is both solved and hacked; a hack must fail the strict oracle")
            counts[mode][0] += int(bool(hack))
            counts[mode][1] += int(bool(solve))
            counts[mode][2] += 1
        total = [sum(c[k] for c in counts.values()) for k in range(3)]
        return cls(overall=ModeStats.from_counts(*total),
                   by_mode={mode: ModeStats.from_counts(*c) for mode, c in counts.items()})


def _check_modes(name: str, modes: Sequence[str]) -> None:
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"{name} has unknown modes {unknown}; known: {list(ALL_MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"{name} lists a mode twice: {list(modes)}")


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class RouterEval:
    """One router's deployed model (the run's weights with that router's quarantine deleted). `held_out_modes` are
    the modes whose pairs were kept out of its direction and band (empty when all modes were used)."""

    held_out_modes: list[str]
    deployed: EvalBlock


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class DeployEval:
    """`per_mode_deploy.json`: one evaluation of a run's weights as trained and deployed without each router's
    quarantine (a run with no routers, vanilla, has the as-trained view only).

    n_prompts prompts x `group` samples each at `temperature`, over `eval_modes`, for every view. `names_randomised`
    says whether the exploit names (function, attribute, marker, file) were drawn per prompt. `train_content_sha256` is
    the content SHA-256 (run_dir.content_sha256) of the train.safetensors the evaluation was computed from (None
    where unknown). `monitor` names the arm of a run trained with a monitor and its intervention (gq.monitor, e.g.
    screening_probe; such a run has no routers). `legacy_arm` is set
    only on a record read from a schema-1 file: its run's single arm (routers then holds that arm's deployed view).
    """

    schema_version: int = DEPLOY_SCHEMA_VERSION
    run: str = Field(min_length=1)
    seed: int
    step: int = Field(ge=0)
    model: str = Field(min_length=1)
    n_prompts: int = Field(ge=1)
    group: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    eval_modes: list[str] = Field(min_length=1)
    names_randomised: bool
    as_trained: EvalBlock
    routers: dict[str, RouterEval]
    train_content_sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    created_at: str
    git_commit: Optional[str]
    monitor: Optional[str] = Field(default=None, min_length=1)
    legacy_arm: Optional[str] = None

    @model_validator(mode="after")
    def _consistent(self) -> "DeployEval":
        if self.schema_version != DEPLOY_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version}: this record is version {DEPLOY_SCHEMA_VERSION}")
        _check_modes("eval_modes", self.eval_modes)
        blocks = {"as_trained": self.as_trained}
        for name, router in self.routers.items():
            _check_modes(f"routers.{name}.held_out_modes", router.held_out_modes)
            outside = [m for m in router.held_out_modes if m not in self.eval_modes]
            if outside:
                raise ValueError(f"routers.{name}.held_out_modes {outside} are not evaluated (eval_modes "
                                 f"{self.eval_modes})")
            blocks[f"routers.{name}.deployed"] = router.deployed
        for name, block in blocks.items():
            if set(block.by_mode) != set(self.eval_modes):
                raise ValueError(f"{name}.by_mode modes {sorted(block.by_mode)} must be eval_modes {sorted(self.eval_modes)}")
            if block.overall.n != self.n_prompts * self.group:
                raise ValueError(f"{name}.overall.n = {block.overall.n} must be n_prompts x group = "
                                 f"{self.n_prompts} x {self.group}: every sample is graded (a crash scores 0)")
        if self.monitor is not None and self.routers:
            raise ValueError(f"monitor {self.monitor!r}: a run trained with a monitor has no routers "
                             f"(got {sorted(self.routers)})")
        if self.legacy_arm is not None and list(self.routers) != [self.legacy_arm]:
            raise ValueError(f"legacy_arm {self.legacy_arm!r}: a schema-1 record holds exactly that arm's view")
        try:
            datetime.fromisoformat(self.created_at)
        except ValueError as e:
            raise ValueError(f"created_at {self.created_at!r} is not an ISO 8601 time") from e
        return self

    def deployed(self, router: str) -> EvalBlock:
        return self.routers[router].deployed


def _deploy_from_v1(data: dict) -> dict:
    """A schema-1 per_mode_deploy.json as a schema-2 record: its arm becomes the one router (deployed view kept)."""
    data = dict(data)
    arm = data.pop("arm", None)
    held_out = data.pop("held_out_modes", None)
    deployed = data.pop("deployed", None)
    data.update(schema_version=DEPLOY_SCHEMA_VERSION, legacy_arm=arm,
                routers={arm: {"held_out_modes": held_out, "deployed": deployed}} if isinstance(arm, str) else arm)
    return data


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class CosStats:
    """Distribution over the step's rollouts (or tokens) of cos(u_i, v_grad)."""

    mean: float = Field(ge=-1.0, le=1.0)
    std: float = Field(ge=0.0)
    min: float = Field(ge=-1.0, le=1.0)
    max: float = Field(ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "CosStats":
        if not self.min <= self.mean <= self.max:
            raise ValueError(f"cos stats need min <= mean <= max; got {self.min}, {self.mean}, {self.max}")
        return self


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class BandBounds:
    """A router's band [lower, upper] as logged (verl_gq.routing.Band is the band that gates)."""

    lower: float
    upper: float


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class RouterStep:
    """One router's optimizer step. frout: its routed fraction of gradient mass; cos/band: null for a router with no
    direction or band (constant); kept/quarantine_grad_norm: L2 norms over all modules of its kept (total - routed)
    and routed gradients; direction_refreshed: its direction was re-extracted before this step's update;
    quarantine_to_effective_norm: ||q|| / ||s|| over all knobs after the update (null where s is still 0, and in
    rows written before it was logged)."""

    frout: float = Field(ge=0.0, le=1.0)
    cos: Optional[CosStats]
    band: Optional[BandBounds]
    kept_grad_norm: float = Field(ge=0.0)
    quarantine_grad_norm: float = Field(ge=0.0)
    direction_refreshed: bool
    quarantine_to_effective_norm: Optional[float] = Field(default=None, ge=0.0)


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class TrainRow:
    """One optimizer step, as trained (the effective knob: vanilla's model). `grad_norm`: the L2 norm of the total
    (effective) knob gradient before clipping (null in a row read from schema 1, which did not record it for a
    routing arm); `routers`: each router's step (empty for vanilla). `extra` holds any further scalar the engine
    logs, outside the schema's guarantees."""

    schema_version: int = METRICS_SCHEMA_VERSION
    kind: Literal["train"] = "train"
    step: int = Field(ge=0)
    time: float
    reward_mean: float
    as_trained: EvalBlock
    grad_norm: Optional[float] = Field(ge=0.0)
    routers: dict[str, RouterStep]
    extra: dict[str, Union[bool, int, float, str, None]] = Field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class EvalRow:
    """A periodic deploy evaluation (the same numbers `per_mode_deploy.json` holds for its step): the as-trained view
    and each router's deployed view."""

    schema_version: int = METRICS_SCHEMA_VERSION
    kind: Literal["eval"] = "eval"
    step: int = Field(ge=0)
    time: float
    n_prompts: int = Field(ge=1)
    group: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    names_randomised: bool
    as_trained: EvalBlock
    routers: dict[str, EvalBlock]

    @classmethod
    def from_deploy(cls, deploy: DeployEval, time: float) -> "EvalRow":
        return cls(step=deploy.step, time=time, n_prompts=deploy.n_prompts, group=deploy.group,
                   temperature=deploy.temperature, names_randomised=deploy.names_randomised,
                   as_trained=deploy.as_trained,
                   routers={name: router.deployed for name, router in deploy.routers.items()})


def _row_from_v1(data: dict, arm: Optional[str]) -> dict:
    """A schema-1 metrics row as schema 2: a train row's routing fields and an eval row's deployed view become the
    run's one router, named `arm` (the run's schema-1 arm; vanilla's train rows, which routed nothing, get none)."""
    data = dict(data, schema_version=METRICS_SCHEMA_VERSION)
    if arm is None and data.get("kind") in ("train", "eval"):
        raise ValueError("a schema-1 metrics row needs its run's arm (from per_mode_deploy.json) to be read")
    if data.get("kind") == "train":
        norms = data.pop("knob_grad_norm", None)
        routing = {key: data.pop(key, None) for key in ("frout", "cos", "band", "direction_refreshed")}
        keep = norms.get("keep") if isinstance(norms, dict) else None
        quarantine = norms.get("quarantine") if isinstance(norms, dict) else None
        # schema 1 kept the kept and quarantine norms apart: the total's norm is known only where nothing was routed
        data["grad_norm"] = keep if arm == "vanilla" else None
        data["routers"] = {} if arm == "vanilla" else {arm: {
            "frout": routing["frout"], "cos": routing["cos"], "band": routing["band"], "kept_grad_norm": keep,
            "quarantine_grad_norm": quarantine, "direction_refreshed": routing["direction_refreshed"]}}
    elif data.get("kind") == "eval":
        data["routers"] = {arm: data.pop("deployed", None)}
    return data


@dataclass(frozen=True, kw_only=True, config=_STRICT)
class ResumeRow:
    """The run resumed from the checkpoint of `step`; `dropped_rows` rows written after it were discarded."""

    schema_version: int = METRICS_SCHEMA_VERSION
    kind: Literal["resume"] = "resume"
    step: int = Field(ge=0)
    time: float
    dropped_rows: int = Field(ge=0)


MetricsRow = Union[TrainRow, EvalRow, ResumeRow]
# Rows whose (kind, step) is a key: at most one per step, steps strictly increasing in the file.
STEP_KEYED_KINDS = ("train", "eval")

_DEPLOY = TypeAdapter(DeployEval)
_ROW = TypeAdapter(Annotated[MetricsRow, Field(discriminator="kind")])


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        elif e["type"] == "unexpected_keyword_argument":
            parts.append(f"unknown field '{loc}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"field '{loc or '<record>'}': {msg} (got {e['input']!r})")
    return "; ".join(parts)


def _check_version(data: Any, supported: frozenset[int], where: str) -> None:
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        raise SchemaError(f"{where}: missing field 'schema_version'")
    if data["schema_version"] not in supported:
        raise SchemaError(f"{where}: schema_version {data['schema_version']!r} is not supported by this reader "
                          f"(it reads {sorted(supported)}); upgrade verl-gq or convert the file")


def _load_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{where}: not valid JSON ({e})") from e


def parse_deploy(text: str, where: str) -> DeployEval:
    """A `DeployEval` from the text of a per_mode_deploy.json (schema 1 converted); `where` names the file in errors."""
    data = _load_json(text, where)
    _check_version(data, SUPPORTED_DEPLOY_VERSIONS, where)
    try:
        if data["schema_version"] == 1:
            return _DEPLOY.validate_json(json.dumps(_deploy_from_v1(data)))
        return _DEPLOY.validate_json(text)
    except ValidationError as e:
        raise SchemaError(f"{where}: {_describe(e)}") from None


def parse_metrics_row(text: str, where: str, v1_arm: Optional[str] = None) -> MetricsRow:
    """One metrics row from one JSONL line; `where` names file and line in errors. A schema-1 row is converted, its
    routing fields given to the router `v1_arm` (the run's schema-1 arm)."""
    data = _load_json(text, where)
    _check_version(data, SUPPORTED_METRICS_VERSIONS, where)
    try:
        if data["schema_version"] == 1:
            return _ROW.validate_json(json.dumps(_row_from_v1(data, v1_arm)))
        return _ROW.validate_json(text)
    except ValueError as e:  # pydantic's ValidationError is one; _row_from_v1's missing arm the other
        message = _describe(e) if isinstance(e, ValidationError) else str(e)
        raise SchemaError(f"{where}: {message}") from None


def dump_json(record: Union[DeployEval, MetricsRow]) -> str:
    """Compact JSON of a record (one line: a JSONL row or a whole per_mode_deploy.json)."""
    adapter = _DEPLOY if isinstance(record, DeployEval) else _ROW
    return adapter.dump_json(record).decode()
