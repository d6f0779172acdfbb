"""Turn a folder of run folders into the complete, mutually comparable arms the tables use, and the problems.

A run folder holds one training run, named `<experiment>_s<seed>` by the recipes. Its arms: each router's deployed
model (arm = the router's name) and, for a run with routers, the model as trained (arm `<experiment>:as_trained`: the
effective knob, vanilla's training by construction); a run with no routers is the arm `vanilla`, or, trained with a
monitor (gq.monitor), the monitor's arm (e.g. `screening_probe`). Arms of one run are
paired with each other by construction, and with arms of other runs by seed. A run written before routers (schema 1)
is its one arm.

Rule: a run enters the tables only if it is complete; an arm's seed only if it is comparable; every other run or
seed is named in a `Problem`.
- Complete: per_mode_deploy.json, metrics.jsonl and train.safetensors all exist and pass their schemas; train rows
  run from step 1 to the deploy step without a gap; the log has an eval row at the deploy step with the same
  numbers as per_mode_deploy.json; the metadata of train.safetensors names the same routers, seed and step; and
  train.safetensors is the file the evaluation was computed from (its SHA-256, where recorded).
- Comparable within its arm: the seeds of an arm share the evaluation settings (step, model, prompts, group,
  temperature, modes, name randomisation, held-out modes), the arm's router config and the run's other `gq`
  settings apart from seed and run_dir. Seeds that differ from the arm's majority are left out; with no strict
  majority the whole arm is left out.
- One run per (arm, seed): duplicates are all left out, since neither can be preferred.
- Missing seeds: every arm is expected to have every seed any arm has (or the seeds given); a gap is a problem.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from tqdm import tqdm

from verl_gq.eval.artifacts.run_dir import RunDir
from verl_gq.eval.artifacts.schema import DeployEval, EvalBlock, EvalRow, SchemaError, TrainRow

# verl's trainer counts global steps from 1; the first train row must be that step.
FIRST_STEP = 1
# Where verl-gq's config block sits in verl's resolved config (verl_gq/verl/config.py).
GQ_CONFIG_PATH = ("actor_rollout_ref", "actor", "fsdp_config", "gq")
# gq fields that legitimately differ between seeds of one arm, and the routers (compared per arm).
PER_SEED_GQ_FIELDS = ("seed", "run_dir", "routers")
VANILLA_ARM = "vanilla"  # a run with no routers
AS_TRAINED = "as_trained"  # the view of a run with routers as trained: arm `<experiment>:as_trained`
SEED_SUFFIX = re.compile(r"_s\d+$")  # a run folder's seed suffix (recipes name runs <experiment>_s<seed>)
# router field <- the gq key that held it in a run written before routers
LEGACY_ROUTER_FIELDS = {"granularity": "granularity", "direction": "direction_source", "band": "band_mode",
                        "refresh": "refresh", "direction_modes": "direction_modes"}


class IncompleteRun(ValueError):
    """A run whose artifacts are missing, invalid or inconsistent; the message says which and how."""


@dataclass(frozen=True)
class Problem:
    """Something wrong with a run or an arm. `excluded`: the subject is left out of every table and figure."""

    subject: str
    message: str
    excluded: bool

    def __str__(self) -> str:
        return f"{'EXCLUDED ' if self.excluded else ''}{self.subject}: {self.message}"


@dataclass(frozen=True)
class ArmDeploy:
    """One arm's deploy evaluation: its deployed view beside the run's as-trained view, with the settings."""

    arm: str
    seed: int
    step: int
    model: str
    n_prompts: int
    group: int
    temperature: float
    eval_modes: list[str]
    names_randomised: bool
    held_out_modes: list[str]
    deployed: EvalBlock
    as_trained: EvalBlock


@dataclass(frozen=True)
class Run:
    """One arm of a complete run: its deploy evaluation, its train and eval rows as flat frames (the train frame's
    `frout` is the arm's own), the arm's router config and the run's other gq settings, and the arm's per-sample
    outcomes of that evaluation (its view of per_sample_deploy.parquet; None where the run has none)."""

    name: str
    deploy: ArmDeploy
    train: pd.DataFrame
    evals: pd.DataFrame
    router: dict[str, Any]
    gq: dict[str, Any]
    samples: Optional[pd.DataFrame] = None
    commit: Optional[str] = None  # the source commit its evaluation recorded (per_mode_deploy.json's git_commit)

    @property
    def arm(self) -> str:
        return self.deploy.arm

    @property
    def seed(self) -> int:
        return self.deploy.seed


def gq_block(config: dict[str, Any], where: str) -> dict[str, Any]:
    node: Any = config
    for key in GQ_CONFIG_PATH:
        if not isinstance(node, dict) or key not in node:
            raise IncompleteRun(f"{where}: resolved config has no '{'.'.join(GQ_CONFIG_PATH)}' block")
        node = node[key]
    if not isinstance(node, dict):
        raise IncompleteRun(f"{where}: '{'.'.join(GQ_CONFIG_PATH)}' is not a mapping")
    return node


def as_trained_arm(run_name: str) -> str:
    """The as-trained arm of a run with routers: its experiment (the folder name without `_s<seed>`) + :as_trained."""
    return f"{SEED_SUFFIX.sub('', run_name)}:{AS_TRAINED}"


def arm_names(deploy: DeployEval) -> list[str]:
    """The arms a deploy evaluation holds (module docstring)."""
    if deploy.legacy_arm is not None:
        return [deploy.legacy_arm]
    if not deploy.routers:
        return [deploy.monitor or VANILLA_ARM]
    return [*deploy.routers, as_trained_arm(deploy.run)]


def default_baseline(arms: Sequence[str]) -> str:
    """The arm to compare with when none is named: the one as-trained arm if there is exactly one, else vanilla."""
    as_trained = [arm for arm in arms if arm.endswith(f":{AS_TRAINED}")]
    return as_trained[0] if len(as_trained) == 1 else VANILLA_ARM


def _arm_deploy(deploy: DeployEval, arm: str) -> ArmDeploy:
    router = deploy.routers.get(arm)
    return ArmDeploy(arm=arm, seed=deploy.seed, step=deploy.step, model=deploy.model, n_prompts=deploy.n_prompts,
                     group=deploy.group, temperature=deploy.temperature, eval_modes=list(deploy.eval_modes),
                     names_randomised=deploy.names_randomised,
                     held_out_modes=list(router.held_out_modes) if router else [],
                     deployed=router.deployed if router else deploy.as_trained, as_trained=deploy.as_trained)


def _flat(block: EvalBlock, prefix: str) -> dict[str, Any]:
    return pd.json_normalize({prefix: dataclasses.asdict(block)}, sep=".").iloc[0].to_dict()


def _arm_frames(arm: str, train: list[TrainRow], evals: list[EvalRow]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The arm's train rows (as trained, its own frout) and eval rows (its deployed view, the as-trained view)."""
    train_rows = [{"step": r.step, "reward_mean": r.reward_mean, "frout": r.routers[arm].frout if arm in r.routers
                   else 0.0, **_flat(r.as_trained, "as_trained")} for r in train]
    eval_rows = [{"step": r.step, **_flat(r.routers.get(arm, r.as_trained), "deployed"),
                  **_flat(r.as_trained, "as_trained")} for r in evals]
    return pd.DataFrame(train_rows), pd.DataFrame(eval_rows)


def load_run(run_dir: RunDir) -> list[Run]:
    """Read and cross-check one run's artifacts; return its arms, or raise IncompleteRun naming the first defect."""
    try:
        deploy = run_dir.read_deploy()
        rows = run_dir.read_metrics(v1_arm=deploy.legacy_arm)
        metadata = run_dir.read_train_metadata()
    except (FileNotFoundError, SchemaError) as e:
        raise IncompleteRun(str(e)) from None
    train = [r for r in rows if isinstance(r, TrainRow)]
    if not train:
        raise IncompleteRun(f"{run_dir.metrics_file}: no train rows")
    if train[0].step != FIRST_STEP:
        raise IncompleteRun(f"{run_dir.metrics_file}: train rows start at step {train[0].step}; "
                            f"steps {FIRST_STEP}..{train[0].step - 1} are missing")
    if train[-1].step != deploy.step:
        raise IncompleteRun(f"{run_dir.deploy_file} evaluates step {deploy.step} but the train rows of "
                            f"{run_dir.metrics_file} end at step {train[-1].step}")
    evals = [r for r in rows if isinstance(r, EvalRow)]
    final_eval = [r for r in evals if r.step == deploy.step]
    if not final_eval:
        raise IncompleteRun(f"{run_dir.metrics_file}: no eval row at the deploy step {deploy.step}")
    if final_eval[0] != EvalRow.from_deploy(deploy, time=final_eval[0].time):
        raise IncompleteRun(f"{run_dir.metrics_file}: the eval row at step {deploy.step} disagrees with "
                            f"{run_dir.deploy_file}; they must be the same evaluation")
    for key in ("seed", "step"):
        if metadata[key] != getattr(deploy, key):
            raise IncompleteRun(f"{run_dir.train_file}: metadata {key}={metadata[key]!r} but {run_dir.deploy_file} "
                                f"says {key}={getattr(deploy, key)!r}")
    if metadata["routers"] != list(deploy.routers):
        raise IncompleteRun(f"{run_dir.train_file}: metadata routers={metadata['routers']} but {run_dir.deploy_file} "
                            f"evaluates routers {list(deploy.routers)}")
    if deploy.train_content_sha256 is not None:
        try:
            content = run_dir.train_content_sha256()
        except SchemaError as e:
            raise IncompleteRun(str(e)) from None
        if content != deploy.train_content_sha256:
            raise IncompleteRun(f"{run_dir.deploy_file} was computed from a train.safetensors of content SHA-256 "
                                f"{deploy.train_content_sha256[:12]}..., but {run_dir.train_file} holds other content "
                                f"({content[:12]}...): the knobs changed after the evaluation")
    gq = gq_block(metadata["resolved_config"], str(run_dir.train_file))
    routers = gq.get("routers") if isinstance(gq.get("routers"), dict) else {}
    if deploy.legacy_arm is not None and deploy.legacy_arm != VANILLA_ARM:
        # a run written before routers: its one arm's routing settings sat at the top of the gq block
        routers = {deploy.legacy_arm: {field: gq.get(legacy) for field, legacy in LEGACY_ROUTER_FIELDS.items()}}
    samples = None
    if run_dir.samples_file.exists():
        try:
            samples = run_dir.read_deploy_samples()
        except SchemaError as e:
            raise IncompleteRun(str(e)) from None
        samples = samples[samples["step"] == deploy.step]
    out = []
    for arm in arm_names(deploy):
        train_frame, eval_frame = _arm_frames(arm, train, evals)
        view = arm if arm in deploy.routers else AS_TRAINED
        out.append(Run(name=run_dir.name, deploy=_arm_deploy(deploy, arm), train=train_frame, evals=eval_frame,
                       router=dict(routers.get(arm) or {}),
                       gq={k: v for k, v in gq.items() if k not in PER_SEED_GQ_FIELDS},
                       samples=None if samples is None else samples[samples["view"] == view].reset_index(drop=True),
                       commit=deploy.git_commit))
    return out


def commit_problem(commit: Optional[str], after: str, repo: Path) -> Optional[str]:
    """Why a run's recorded commit does not show that it ran after commit `after` in the git checkout `repo` (the
    preregistration's rule: its commit precedes every study run's); None when it does."""
    if commit is None:
        return f"its evaluation records no source commit: it cannot be shown to follow {after}"
    if commit.endswith("-dirty"):
        return f"it ran with uncommitted changes on top of {commit.removesuffix('-dirty')}"
    check = subprocess.run(["git", "merge-base", "--is-ancestor", after, commit], cwd=repo, capture_output=True,
                           text=True)
    if check.returncode == 1:
        return f"its commit {commit} does not descend from {after}"
    if check.returncode != 0:
        return f"git cannot place its commit {commit} after {after} in {repo}: {check.stderr.strip()}"
    return None


def eval_settings(deploy: ArmDeploy) -> dict[str, Any]:
    """What must match for two deploy evaluations to be compared."""
    return {"step": deploy.step, "model": deploy.model, "n_prompts": deploy.n_prompts, "group": deploy.group,
            "temperature": deploy.temperature, "eval_modes": sorted(deploy.eval_modes),
            "names_randomised": deploy.names_randomised}


def _arm_settings(run: Run) -> dict[str, Any]:
    return {**eval_settings(run.deploy), "held_out_modes": sorted(run.deploy.held_out_modes), "router": run.router,
            "gq": run.gq}


def differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in a if a[k] != b.get(k)]


@dataclass
class RunSet:
    """The usable runs by arm, and everything that kept a run or seed out."""

    arms: dict[str, list[Run]]
    problems: list[Problem]
    expected_seeds: list[int]
    excluded_runs: list[str] = field(default_factory=list)


def collect_runs(root: Path, expected_seeds: Optional[Sequence[int]] = None, after_commit: Optional[str] = None,
                 repo: Path = Path(".")) -> RunSet:
    """Every subfolder of `root` is a run; return the usable arms' runs by arm (sorted by seed) and the problems.
    With `after_commit`, a run whose recorded commit does not descend from it in the checkout `repo` is left out
    (`commit_problem`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of runs")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{root}: holds no run folders")
    problems: list[Problem] = []
    excluded: list[str] = []
    loaded: list[Run] = []
    for folder in tqdm(folders, desc=f"{root}: runs", unit="run", disable=None):
        try:
            arms_of_run = load_run(RunDir(folder))
        except IncompleteRun as e:
            problems.append(Problem(f"run {folder.name}", str(e), excluded=True))
            excluded.append(folder.name)
            continue
        why = commit_problem(arms_of_run[0].commit, after_commit, repo) if after_commit and arms_of_run else None
        if why is not None:
            problems.append(Problem(f"run {folder.name}", f"not a preregistered run: {why}", excluded=True))
            excluded.append(folder.name)
            continue
        loaded.extend(arms_of_run)

    by_key: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in loaded:
        by_key[(run.arm, run.seed)].append(run)
    arms: dict[str, list[Run]] = defaultdict(list)
    for (arm, seed), runs in sorted(by_key.items()):
        if len(runs) > 1:
            names = [r.name for r in runs]
            for r in runs:
                problems.append(Problem(f"run {r.name}", f"arm {arm} seed {seed} is claimed by runs {names}; "
                                        f"all are left out (one run per arm and seed)", excluded=True))
                excluded.append(r.name)
        else:
            arms[arm].append(runs[0])

    for arm, runs in list(arms.items()):
        signatures = [json.dumps(_arm_settings(r), sort_keys=True) for r in runs]
        counts = Counter(signatures).most_common()
        if len(counts) == 1:
            continue
        majority, top = counts[0]
        tie = counts[1][1] == top
        reference = json.loads(majority)
        kept = []
        for run, signature in zip(runs, signatures):
            if signature == majority and not tie:
                kept.append(run)
                continue
            if tie:
                why = "no strict majority of settings among its seeds"
            else:
                differ = differing_fields(_arm_settings(run), reference)
                why = f"{differ} differ from the other seeds' {[reference[f] for f in differ]}"
            problems.append(Problem(f"run {run.name}", f"arm {arm} seed {run.seed}: {why}", excluded=True))
            excluded.append(run.name)
        if kept:
            arms[arm] = kept
        else:
            del arms[arm]

    seeds = sorted(set(expected_seeds) if expected_seeds is not None
                   else {r.seed for runs in arms.values() for r in runs})
    for arm, runs in sorted(arms.items()):
        missing = sorted(set(seeds) - {r.seed for r in runs})
        if missing:
            problems.append(Problem(f"arm {arm}", f"no complete run for seeds {missing} (expected seeds {seeds})",
                                    excluded=False))
    return RunSet(arms=dict(sorted(arms.items())), problems=problems, expected_seeds=seeds, excluded_runs=excluded)
