"""The `gq_sync` trainer: verl's synchronous V1 trainer plus what gradient quarantine needs around it.

Selected with `trainer.v1.trainer_mode=gq_sync` (verl's trainer registry; verl is not forked). On top of
`PPOTrainerSync` it
- runs the actor in `GQActorRolloutRefWorker`, which can switch the quarantine knob and save the adapter;
- takes the reference policy from the actor with the adapter disabled (the base model: no second copy of the
  weights), the way verl does for LoRA (`ref_in_actor`);
- evaluates twice at every validation: the deployed model (quarantine off, weights re-synced to the rollout) and
  the model as trained (quarantine on); the deployed pass is what verl logs as `val-*`, the other is logged as
  `val_as_trained/*`, and both go to `per_mode_deploy.json`;
- logs the reward's per-sample fields (solve, hack, compile, channel by mode) as `train/*` metrics every step;
- writes the run artifacts under `gq.run_dir` (docs/outputs.md): metrics.jsonl (a row per step and per
  evaluation), per_mode_deploy.json (the latest evaluation) and train.safetensors (at save points and the end).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections import defaultdict
from typing import Optional

import numpy as np
import ray
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from reward.modes import ALL_MODES, MODES, held_out_modes, mode_name
from verl_gq.eval import (
    CosStats,
    DeployEval,
    EvalBlock,
    KnobGradNorms,
    RunDir,
    TrainRow,
    record_deploy_evaluation,
    source_commit,
)
from verl_gq.eval import Band as BandRow
from verl_gq.verl.worker import GQActorRolloutRefWorker

logger = logging.getLogger(__name__)

TRAINER_MODE = "gq_sync"
HELD_OUT_SUFFIX = "_heldout"  # appended to the arm of a run whose direction holds modes out
# reward fields that become per-mode training metrics (numeric per-sample values from reward/verl_entry.py)
REWARD_METRIC_FIELDS = ("solve", "hack", "compile", "channel")


def per_mode_means(extra: dict[str, list]) -> dict[str, float]:
    """`train/<field>/<mode>` means of the reward's numeric per-sample fields, plus `/all`.

    Samples without a `mode` field (another reward function) are reported under `all` only.
    """
    out: dict[str, float] = {}
    modes = extra.get("mode")
    for name in REWARD_METRIC_FIELDS:
        values = extra.get(name)
        if not values:
            continue
        arr = np.asarray(values, dtype=np.float64)
        out[f"train/{name}/all"] = float(arr.mean())
        if modes is None:
            continue
        mode_arr = np.asarray(modes, dtype=np.int64)
        for mid in np.unique(mode_arr):
            out[f"train/{name}/{mode_name(int(mid))}"] = float(arr[mode_arr == mid].mean())
    return out


def eval_block(extra: dict[str, list]) -> Optional[EvalBlock]:
    """Per-mode hack/solve rates of samples carrying the substrate's fields; None for another reward."""
    if not all(key in extra for key in ("mode", "solve", "hack")):
        return None
    modes = [mode_name(int(m)) for m in extra["mode"]]
    eval_modes = [m for m in ALL_MODES if m in modes or m in MODES]
    return EvalBlock.from_samples(modes, [bool(s) for s in extra["solve"]], [bool(h) for h in extra["hack"]],
                                  eval_modes=eval_modes)


def arm_name(gq) -> str:
    """The arm's name in the artifacts and tables: gq.arm (or the method), plus `_heldout` when modes are held out
    of the direction (gq.direction_modes, recipes/held_out_modes.yaml). A held-out run is its own arm: under the
    base arm's name it would claim the same (arm, seed) as the base run, and the report would leave both out."""
    name = gq.get("arm") or gq.get("method")
    if held_out_modes(gq.get("direction_modes")) and not name.endswith(HELD_OUT_SUFFIX):
        name += HELD_OUT_SUFFIX
    return name


@register_trainer(TRAINER_MODE)
class GQTrainer(PPOTrainerSync):
    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        # The actor worker gains set_quarantine/save_adapter; the reference policy comes from the actor (adapter
        # disabled), so a combined actor+rollout+ref role becomes actor+rollout and no reference copy is built.
        for role in (Role.ActorRolloutRef, Role.ActorRollout, Role.Actor):
            if role in self.role_worker_mapping:
                pool = self.mapping.pop(role)
                self.role_worker_mapping.pop(role)
                new_role = Role.ActorRollout if role == Role.ActorRolloutRef else role
                self.role_worker_mapping[new_role] = ray.remote(GQActorRolloutRefWorker)
                self.mapping[new_role] = pool
        self.role_worker_mapping.pop(Role.RefPolicy, None)
        self.mapping.pop(Role.RefPolicy, None)

    def _setup(self):
        super()._setup()  # ends with verl's checkpoint load: global_steps is the resume step from here on
        if self.use_reference_policy:
            # engine.disable_adapter() is the base model: verl's ref_in_actor path computes the
            # reference log-probs with the actor's adapter disabled (no_lora_adapter=True).
            self.ref_in_actor = True
            self.ref_policy_wg = self.actor_rollout_wg
        self.gq = self.config.actor_rollout_ref.actor.fsdp_config.gq
        self.run_dir = RunDir(self.gq.run_dir) if self.gq.get("run_dir") else None
        self.metrics_log = None
        if self.run_dir is not None:
            os.makedirs(self.run_dir.path, exist_ok=True)
            resume = self.global_steps if self.global_steps > 0 else None
            self.metrics_log = self.run_dir.open_metrics_log(resume_from_step=resume)
        self._val_samples: dict[str, list] = {}

    # --- identity of the run -----------------------------------------------------------------------------------

    @property
    def arm(self) -> str:
        return arm_name(self.gq)

    @property
    def held_out_modes(self) -> list[str]:
        return held_out_modes(self.gq.get("direction_modes"))

    # --- deploy evaluation ------------------------------------------------------------------------------------

    def _set_quarantine(self, on: bool) -> None:
        self.actor_rollout_wg.set_quarantine(on)
        self.checkpoint_manager.update_weights(self.global_steps)

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs):
        # the per-sample reward fields of the validation pass that just ran (verl keeps them local to _validate)
        self._val_samples = {k: list(v) for k, v in reward_extra_infos_dict.items()}
        return super()._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs)

    def _validate(self) -> dict[str, float]:
        self._set_quarantine(False)
        deployed_metrics = super()._validate()
        deployed = eval_block(self._val_samples)
        self._set_quarantine(True)
        as_trained_metrics = super()._validate()
        as_trained = eval_block(self._val_samples)
        if self.run_dir is not None and deployed is not None and as_trained is not None:
            self._record_deploy(deployed, as_trained)
        metrics = dict(deployed_metrics)
        metrics.update({f"val_as_trained/{k.split('/', 1)[-1]}": v for k, v in as_trained_metrics.items()})
        return metrics

    def _record_deploy(self, deployed: EvalBlock, as_trained: EvalBlock) -> None:
        group = int(self.config.actor_rollout_ref.rollout.val_kwargs.n)
        eval_modes = sorted(deployed.by_mode, key=ALL_MODES.index)
        deploy = DeployEval(
            run=self.run_dir.name,
            arm=self.arm,
            seed=int(self.gq.seed),
            step=int(self.global_steps),
            model=str(self.config.actor_rollout_ref.model.path),
            n_prompts=deployed.overall.n // group,
            group=group,
            temperature=float(self.config.actor_rollout_ref.rollout.val_kwargs.temperature),
            eval_modes=eval_modes,
            names_randomised=bool(self.config.data.get("names_randomised", False)),
            held_out_modes=self.held_out_modes,
            deployed=deployed,
            as_trained=as_trained,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            git_commit=source_commit(),
        )
        record_deploy_evaluation(self.run_dir, self.metrics_log, deploy)

    # --- per-step metrics and artifacts -----------------------------------------------------------------------

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        result = super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        extra = self._reward_fields(batch)
        metrics.update(per_mode_means(extra))
        if self.metrics_log is not None:
            self._append_train_row(metrics, extra)
            if global_steps >= self.total_training_steps:
                self._save_adapter()
        return result

    def _reward_fields(self, batch) -> dict[str, list]:
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra: dict[str, list] = defaultdict(list)
        for fields in data.pop("extra_fields").tolist():
            info = fields.get("reward_extra_info", {}) if isinstance(fields, dict) else {}
            for key in ("mode",) + REWARD_METRIC_FIELDS:
                if key in info:
                    extra[key].append(info[key])
        lengths = {len(v) for v in extra.values()}
        if len(lengths) > 1:
            raise ValueError(f"reward extra fields have unequal counts { {k: len(v) for k, v in extra.items()} }")
        return extra

    def _append_train_row(self, metrics: dict, extra: dict[str, list]) -> None:
        as_trained = eval_block(extra)
        if as_trained is None:
            raise ValueError("gq.run_dir needs the substrate's reward fields (mode, solve, hack) in every sample; "
                             "use reward.verl_entry.compute_score or unset gq.run_dir")

        def gq(key, default=None):
            return metrics.get(f"actor/gq/{key}", default)

        cos = band = None
        if gq("cos_mean") is not None:
            cos = CosStats(mean=gq("cos_mean"), std=gq("cos_std"), min=gq("cos_min"), max=gq("cos_max"))
            band = BandRow(lower=gq("band_lower"), upper=gq("band_upper"))
        row = TrainRow(
            step=int(self.global_steps),
            time=time.time(),
            reward_mean=float(metrics["critic/score/mean"]),
            as_trained=as_trained,
            frout=float(gq("frout", 0.0)),
            cos=cos,
            band=band,
            knob_grad_norm=KnobGradNorms(keep=float(gq("keep_grad_norm", metrics.get("actor/grad_norm", 0.0))),
                                         quarantine=float(gq("quarantine_grad_norm", 0.0))),
            direction_refreshed=gq("refresh") is not None,
            extra={k: float(v) for k, v in metrics.items() if k.startswith("actor/gq/") and np.isscalar(v)},
        )
        self.metrics_log.append(row)

    def _save_checkpoint(self):
        super()._save_checkpoint()
        if self.run_dir is not None:
            self._save_adapter()

    def _save_adapter(self) -> None:
        metadata = {
            "resolved_config": json.dumps(OmegaConf.to_container(self.config, resolve=True), default=str),
            "arm": self.arm,
            "seed": str(int(self.gq.seed)),
            "step": str(int(self.global_steps)),
        }
        self.actor_rollout_wg.save_adapter(str(self.run_dir.train_file), metadata)
