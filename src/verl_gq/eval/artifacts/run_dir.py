"""A run's artifact folder, `out/runs/<run>/`, and the append-only metrics log.

    train.safetensors     knobs, bases fingerprint, every router's direction and band (format: verl_gq.adapter);
                          its safetensors metadata carries `resolved_config` (JSON), `routers` (JSON list), `seed`,
                          `step`
    per_mode_deploy.json  the latest deploy evaluation (schema.DeployEval), with the content SHA-256 of the
                          train.safetensors it was computed from; at the end of a run, the final one
    per_sample_deploy.parquet  the same evaluation's graded answers, one row each (samples.py)
    metrics.jsonl         one schema.MetricsRow per line: train rows per step, eval rows, resume events
    config.yaml           optional copy of the resolved config, for people; readers use the metadata

Metrics-log rule (what makes resuming safe). Train and eval rows are keyed by step: within one kind, steps in the
file strictly increase, and train steps are consecutive. A fresh log refuses to open over a file that already has
rows (two runs must not share a log). Resuming from the checkpoint of step S keeps every row with step <= S,
drops the rows with step > S (the interrupted attempt wrote them from weights that no longer exist) and records a
`resume` row saying how many were dropped; training then appends step S+1 onward to the same file. A write that
repeats or goes back on a step is an error, so no step is ever in the log twice.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import subprocess
import time as time_module
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from safetensors import safe_open

from reward.modes import ALL_MODES
from verl_gq.eval.artifacts.schema import (
    STEP_KEYED_KINDS,
    DeployEval,
    EvalBlock,
    RouterEval,
    EvalRow,
    MetricsRow,
    ResumeRow,
    SchemaError,
    dump_json,
    parse_deploy,
    parse_metrics_row,
)
from verl_gq.eval.artifacts.samples import SAMPLES_FILE, check_matches, check_samples, read_samples

TRAIN_FILE = "train.safetensors"
DEPLOY_FILE = "per_mode_deploy.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
# safetensors metadata keys this package reads (values are strings, as safetensors requires); files written before
# routers name one `arm` instead of `routers`.
METADATA_KEYS = ("resolved_config", "seed", "step")


PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the verl_gq package
# written into an offline bundle's copy of the package by scripts/offline_bundle.py: the commit it was built from
SOURCE_COMMIT_FILE = "SOURCE_COMMIT"


def source_commit(package_dir: Path = PACKAGE_DIR) -> Optional[str]:
    """The verl-gq checkout's HEAD, with "-dirty" for uncommitted changes, for an artifact's provenance; outside a
    git checkout, the commit stamped into the package (`SOURCE_COMMIT`, an offline bundle's), else None (a wheel)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, timeout=10, check=True, cwd=package_dir).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        stamp = package_dir / SOURCE_COMMIT_FILE
        return stamp.read_text().strip() or None if stamp.is_file() else None


class MetricsLogError(RuntimeError):
    """A write that would break the metrics-log rule (duplicate step, log of another run, missing rows)."""


def _atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one (a crash mid-write leaves the old)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number from 1, text, ends with newline) for each non-empty line."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line.rstrip("\n"), line.endswith("\n")


def read_metrics_rows(path: Path, *, tolerate_torn_tail: bool = False,
                      v1_arm: Optional[str] = None) -> tuple[list[MetricsRow], int]:
    """Every row of a metrics log, validated, and the number of torn tail lines skipped (0 or 1).

    A torn tail is a last line without its newline that does not parse: what a kill mid-write leaves. It is
    skipped only when `tolerate_torn_tail` (the resume path, which records it as dropped); readers for tables
    treat it as the schema error it is. Step order is checked per kind: a repeated or decreasing step is an error.
    Schema-1 rows are converted with their routing under router `v1_arm` (schema.parse_metrics_row).
    """
    raw = list(_lines(path))
    rows: list[MetricsRow] = []
    torn = 0
    last_step: dict[str, int] = {}
    for index, (number, text, has_newline) in enumerate(raw):
        where = f"{path}:{number}"
        try:
            row = parse_metrics_row(text, where, v1_arm)
        except SchemaError:
            if tolerate_torn_tail and index == len(raw) - 1 and not has_newline:
                torn = 1
                break
            raise
        if row.kind in STEP_KEYED_KINDS:
            previous = last_step.get(row.kind)
            if previous is not None and row.step <= previous:
                raise SchemaError(f"{where}: {row.kind} row for step {row.step} after step {previous}; "
                                  f"{row.kind} steps must strictly increase (no step logged twice)")
            if row.kind == "train" and previous is not None and row.step != previous + 1:
                raise SchemaError(f"{where}: train row for step {row.step} after step {previous}; "
                                  f"train steps must be consecutive (steps {previous + 1}..{row.step - 1} missing)")
            last_step[row.kind] = row.step
        rows.append(row)
    return rows, torn


class MetricsLog:
    """Appends validated rows to `metrics.jsonl`, one flushed and fsynced line per row (see the module rule)."""

    def __init__(self, path: Path, resume_from_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows, torn = read_metrics_rows(self.path, tolerate_torn_tail=True) if self.path.exists() else ([], 0)
        if resume_from_step is None:
            if rows or torn:
                last = max(r.step for r in rows) if rows else "?"
                raise MetricsLogError(f"{self.path} already holds rows up to step {last}: a new run needs an empty "
                                      f"log; to continue this run pass resume_from_step=<checkpoint step>")
            self._last_step: dict[str, int] = {}
            return
        last_train = max((r.step for r in rows if r.kind == "train"), default=None)
        if resume_from_step > 0 and (last_train is None or last_train < resume_from_step):
            raise MetricsLogError(f"resuming from the checkpoint of step {resume_from_step}, but {self.path} has train "
                                  f"rows only up to step {last_train}: the log and the checkpoint are not of one run")
        kept = [r for r in rows if r.step <= resume_from_step]
        _atomic_write_text(self.path, "".join(dump_json(r) + "\n" for r in kept))
        self._last_step = {}
        for row in kept:
            if row.kind in STEP_KEYED_KINDS:
                self._last_step[row.kind] = row.step
        self.append(ResumeRow(step=resume_from_step, time=time_module.time(),
                              dropped_rows=len(rows) - len(kept) + torn))

    def append(self, row: MetricsRow) -> None:
        if row.kind in STEP_KEYED_KINDS:
            previous = self._last_step.get(row.kind)
            if previous is not None and row.step <= previous:
                raise MetricsLogError(f"{row.kind} row for step {row.step}, but {self.path} already has {row.kind} "
                                      f"step {previous}: a step is written once, in increasing order")
            if row.kind == "train" and previous is not None and row.step != previous + 1:
                raise MetricsLogError(f"train row for step {row.step} right after step {previous}: "
                                      f"every optimizer step gets a train row")
            self._last_step[row.kind] = row.step
        with open(self.path, "a") as f:
            f.write(dump_json(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class RunDir:
    """The artifact folder of one run; its name is the run's name."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train_file(self) -> Path:
        return self.path / TRAIN_FILE

    @property
    def deploy_file(self) -> Path:
        return self.path / DEPLOY_FILE

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def write_deploy(self, deploy: DeployEval) -> None:
        if deploy.run != self.name:
            raise ValueError(f"deploy evaluation of run {deploy.run!r} cannot be written into run folder {self.path}")
        _atomic_write_text(self.deploy_file, dump_json(deploy) + "\n")

    def read_deploy(self) -> DeployEval:
        if not self.deploy_file.exists():
            raise FileNotFoundError(f"{self.deploy_file}: no deploy evaluation (the run never reached one)")
        deploy = parse_deploy(self.deploy_file.read_text(), str(self.deploy_file))
        if deploy.run != self.name:
            raise SchemaError(f"{self.deploy_file}: field 'run' is {deploy.run!r} but the file lives in run folder "
                              f"{self.name!r}")
        return deploy

    def write_deploy_samples(self, samples: pd.DataFrame, path: Optional[Path] = None) -> None:
        """Write per-sample outcomes (to `path`, default the run's samples_file) atomically."""
        path = path or self.samples_file
        samples = check_samples(samples, str(path))
        tmp = path.with_name(path.name + ".tmp")
        samples.to_parquet(tmp, index=False)
        os.replace(tmp, path)

    def read_deploy_samples(self) -> pd.DataFrame:
        if not self.samples_file.exists():
            raise FileNotFoundError(f"{self.samples_file}: no per-sample outcomes (the run never reached a deploy "
                                    "evaluation, or an evaluation of another reward wrote rates only)")
        return read_samples(self.samples_file)

    def open_metrics_log(self, resume_from_step: Optional[int] = None) -> MetricsLog:
        return MetricsLog(self.metrics_file, resume_from_step)

    def read_metrics(self, v1_arm: Optional[str] = None) -> list[MetricsRow]:
        """The metrics log's rows; `v1_arm`: the router schema-1 rows' routing belongs to (the run's arm)."""
        if not self.metrics_file.exists():
            raise FileNotFoundError(f"{self.metrics_file}: no metrics log")
        return read_metrics_rows(self.metrics_file, v1_arm=v1_arm)[0]

    def train_content_sha256(self) -> str:
        """SHA-256 of train.safetensors' content: every tensor (name, dtype, shape, bytes) and every metadata item, in
        sorted order. What per_mode_deploy.json records as the knobs it evaluated; unlike the file's bytes it does
        not change when the same content is saved again (safetensors writes its header's keys in no fixed order)."""
        return content_sha256(self.train_file)

    def read_train_metadata(self) -> dict[str, Any]:
        """The metadata of train.safetensors this package relies on: resolved_config parsed, seed/step as ints, and
        `routers` (a list; a file written before routers: its one `arm`)."""
        if not self.train_file.exists():
            raise FileNotFoundError(f"{self.train_file}: no saved knobs")
        # numpy: the header is all this reads, and the report need not import torch (any dtype opens this way)
        try:
            with safe_open(self.train_file, framework="numpy") as f:
                metadata = f.metadata() or {}
        except Exception as error:  # safetensors raises its own types for a truncated or garbled header
            raise SchemaError(f"{self.train_file}: not a readable safetensors file ({type(error).__name__}: "
                              f"{error})") from None
        missing = [k for k in METADATA_KEYS if k not in metadata]
        if "routers" not in metadata and "arm" not in metadata:
            missing.append("routers")
        if missing:
            raise SchemaError(f"{self.train_file}: metadata lacks {missing} (needs {list(METADATA_KEYS)} and "
                              "routers)")
        try:
            config = json.loads(metadata["resolved_config"])
        except json.JSONDecodeError as e:
            raise SchemaError(f"{self.train_file}: metadata 'resolved_config' is not JSON ({e})") from None
        if not isinstance(config, dict):
            raise SchemaError(f"{self.train_file}: metadata 'resolved_config' must be a JSON object")
        if "routers" in metadata:
            try:
                routers = json.loads(metadata["routers"])
            except json.JSONDecodeError as e:
                raise SchemaError(f"{self.train_file}: metadata 'routers' is not JSON ({e})") from None
            if not isinstance(routers, list) or not all(isinstance(r, str) for r in routers):
                raise SchemaError(f"{self.train_file}: metadata 'routers' must be a JSON list of names")
        else:
            routers = [metadata["arm"]]
        parsed: dict[str, Any] = {"resolved_config": config, "routers": routers}
        for key in ("seed", "step"):
            try:
                parsed[key] = int(metadata[key])
            except ValueError:
                raise SchemaError(f"{self.train_file}: metadata '{key}' is {metadata[key]!r}, not an integer") from None
        return parsed


def content_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's content in a canonical order (see RunDir.train_content_sha256). Reads the
    format directly (an 8-byte header length, a JSON header, the tensors' bytes), so it needs no torch."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        data = raw[8 + length :]
        metadata = header.pop("__metadata__", {}) or {}
        digest = hashlib.sha256()
        for name in sorted(header):
            entry = header[name]
            start, end = entry["data_offsets"]
            digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            digest.update(data[start:end])
        digest.update(json.dumps(sorted(metadata.items())).encode())
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise SchemaError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    return digest.hexdigest()


def deploy_evaluation(run_dir: RunDir, *, seed: int, step: int, model: str, group: int, temperature: float,
                      names_randomised: bool, as_trained: EvalBlock, deployed: dict[str, EvalBlock],
                      held_out_modes: dict[str, list[str]], monitor: Optional[str] = None) -> DeployEval:
    """The record of per_mode_deploy.json for an evaluation of the run's saved knobs (the one builder: the trainer
    and the stand-alone evaluation both make theirs here): the as-trained block, each router's deployed block with
    the modes its direction held out, n_prompts from the samples and the group, the content hash of the
    train.safetensors it read, the time and the source commit."""
    return DeployEval(
        run=run_dir.name, seed=seed, step=step, model=model, n_prompts=as_trained.overall.n // group, group=group,
        temperature=temperature, eval_modes=sorted(as_trained.by_mode, key=ALL_MODES.index),
        names_randomised=names_randomised, as_trained=as_trained,
        routers={name: RouterEval(held_out_modes=list(held_out_modes.get(name, [])), deployed=block)
                 for name, block in deployed.items()},
        train_content_sha256=run_dir.train_content_sha256(),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(), git_commit=source_commit(),
        monitor=monitor,
    )


def deploy_blocks(deploy: DeployEval) -> dict[str, EvalBlock]:
    """{view: block} of a deploy evaluation: "as_trained" and each router's deployed model."""
    return {"as_trained": deploy.as_trained, **{name: r.deployed for name, r in deploy.routers.items()}}


def record_deploy_evaluation(run_dir: RunDir, log: MetricsLog, deploy: DeployEval,
                             samples: Optional[pd.DataFrame] = None) -> None:
    """Write a deploy evaluation: per_sample_deploy.parquet (when the samples are known; they must count to the
    rates), per_mode_deploy.json (the latest) and an eval row in the metrics log."""
    if samples is not None:
        if not (samples["step"] == deploy.step).all():
            raise ValueError(f"{run_dir.samples_file}: samples of steps {sorted(set(samples['step']))}, the "
                             f"evaluation's step is {deploy.step}")
        check_matches(samples, deploy_blocks(deploy), str(run_dir.samples_file))
        run_dir.write_deploy_samples(samples)
    elif run_dir.samples_file.exists():
        run_dir.samples_file.unlink()  # an earlier evaluation's samples must not pass for this one's
    run_dir.write_deploy(deploy)
    log.append(EvalRow.from_deploy(deploy, time=time_module.time()))
