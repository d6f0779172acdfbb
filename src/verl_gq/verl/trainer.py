"""The `gq_sync` trainer: verl's synchronous V1 trainer plus what gradient quarantine needs around it.

Selected with `trainer.v1.trainer_mode=gq_sync` (verl's trainer registry, registered by verl_gq/verl/plugin.py; verl
is not forked). On top of
`PPOTrainerSync` it
- runs the actor in `GQActorRolloutRefWorker`, which can switch the model's view and save the adapter;
- takes the reference policy from the actor with the adapter disabled (the base model: no second copy of the
  weights), the way verl does for LoRA (`ref_in_actor`);
- evaluates every view at every validation: the model as trained (what verl logs as `val-*`), then each router's
  deployed model (its quarantine deleted, weights re-synced to the rollout; logged as `val_deployed/<router>/*`);
  all go to `per_mode_deploy.json`, and every graded answer to `per_sample_deploy.parquet`;
- logs the reward's per-sample fields (solve, hack, compile, channel by mode) as `train/*` metrics every step;
- with `gq.monitor`, replaces verl's GRPO advantage by the monitored one (verl_gq.monitor: a probe or the grader's
  labels flag rollouts, penalty or screening acts on the flags) and logs the flags' rate, recall and precision;
- writes the run artifacts under `gq.run_dir` (docs/outputs.md): metrics.jsonl (a row per step and per
  evaluation), per_mode_deploy.json (the latest evaluation) and train.safetensors (at save points and the end).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Optional

import numpy as np
import pandas as pd
import ray
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from verl.trainer.ppo.utils import Role, create_rl_dataset
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.dataset.rl_dataset import collate_fn

from reward.modes import ALL_MODES, MODES, held_out_modes, mode_name
from reward.verl_entry import SAMPLE_IDENTITY_FIELDS
from verl_gq.eval.artifacts import (
    CosStats,
    EvalBlock,
    RouterStep,
    RunDir,
    TrainRow,
    deploy_evaluation,
    record_deploy_evaluation,
)
from verl_gq.eval.artifacts import BandBounds
from verl_gq.eval.artifacts.samples import view_samples
from verl_gq.monitor import build_monitor, flag_quality, monitored_advantage
from verl_gq.routing.metrics import StepMetrics
from verl_gq.verl.config import GQConfig
from verl_gq.verl.pairs import tokenized_pairs
from verl_gq.verl.worker import GQActorRolloutRefWorker

logger = logging.getLogger(__name__)

TRAINER_MODE = "gq_sync"
ROLLOUT_N = "__rollout_n__"  # a validation row's samples, read by verl's trainer and agent loop (else val_kwargs.n)
GQ_METRICS = "actor/gq/"  # where verl logs the engine's routing metrics (verl_gq.routing.metrics.StepMetrics)
MONITOR_METRICS = "gq/monitor/"  # the monitor's flag rate, recall, precision and the probe's fit
MONITOR_STATE_FILE = "gq_monitor.json"  # the probe beside verl's checkpoint, so a resumed run flags as the unbroken one
# router metrics a train row holds in its typed fields; the others go to its `extra`
TYPED_ROUTER_METRICS = ("/frout", "/kept_grad_norm", "/quarantine_grad_norm", "/band_lower", "/band_upper",
                        "/cos/mean", "/cos/std", "/cos/min", "/cos/max", "/quarantine_to_effective_norm")
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


def samples_of(extra: dict[str, list], view: str, step: int) -> Optional[pd.DataFrame]:
    """Every graded answer of one view (artifacts.samples); None for a reward without the substrate's fields and
    the sample's identity (reward.verl_entry.sample_identity)."""
    if not all(key in extra for key in ("mode", "solve", "hack", "channel", *SAMPLE_IDENTITY_FIELDS)):
        return None
    return view_samples(view, step, [int(p) for p in extra["prompt_index"]],
                        [mode_name(int(m)) for m in extra["mode"]], [bool(s) for s in extra["solve"]],
                        [bool(h) for h in extra["hack"]], [bool(c) for c in extra["channel"]],
                        [int(n) for n in extra["response_chars"]])


# verl checkpoint engines that ship the actor's own (sharded) tensors instead of the engine's merged-weight stream: the
# rollout would receive the knobs and bases, not the merged weights of the view it should sample from
UNSUPPORTED_CHECKPOINT_ENGINES = ("delta_sharded",)


def check_trainer_config(config) -> None:
    """What the gq trainer cannot honour, refused before any worker is built: a checkpoint engine that bypasses
    the merged-weight stream, a monitor on an advantage other than GRPO's outcome one, and a reward sandbox that
    cannot isolate on this host."""
    monitor = GQConfig.from_any(config.actor_rollout_ref.actor.fsdp_config.get("gq")).monitor_spec
    if monitor is not None and (config.algorithm.adv_estimator != "grpo" or config.algorithm.use_kl_in_reward):
        raise ValueError(f"gq.monitor ({monitor.name}) acts on GRPO's outcome advantage; set "
                         "algorithm.adv_estimator=grpo and algorithm.use_kl_in_reward=false")
    backend = config.actor_rollout_ref.rollout.get("checkpoint_engine", {}).get("backend", "naive")
    if backend in UNSUPPORTED_CHECKPOINT_ENGINES:
        raise ValueError(f"actor_rollout_ref.rollout.checkpoint_engine.backend={backend!r}: it ships the actor's "
                         "sharded tensors (knobs and bases) instead of the gq engine's merged weights of the model's "
                         "view; use naive (or nccl, nixl)")
    if config.reward.get("custom_reward_function", {}).get("path") == "pkg://reward.verl_entry":
        from reward.sandbox import isolation_problems

        problems = isolation_problems()
        if problems:
            raise RuntimeError("the LeetCode reward's sandbox cannot isolate graded programs on this host: "
                               + "; ".join(problems))


class GQTrainer(PPOTrainerSync):
    def _init_resource_pool_mgr(self):
        check_trainer_config(self.config)  # the trainer's first step, in the TaskRunner: before any worker starts
        super()._init_resource_pool_mgr()
        # The actor worker gains set_view/save_adapter; the reference policy comes from the actor (adapter
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
        self.gq = GQConfig.from_any(self.config.actor_rollout_ref.actor.fsdp_config.gq)
        self.run_dir = RunDir(self.gq.run_dir) if self.gq.run_dir else None
        self.metrics_log = None
        if self.run_dir is not None:
            os.makedirs(self.run_dir.path, exist_ok=True)
            resume = self.global_steps if self.global_steps > 0 else None
            self.metrics_log = self.run_dir.open_metrics_log(resume_from_step=resume)
        self._val_samples: dict[str, list] = {}
        self._eval_group = int(self.config.actor_rollout_ref.rollout.val_kwargs.n)  # samples a prompt, this pass
        self._final_group = self.gq.final_eval_n or self._eval_group
        self._final_eval = self._final_eval_loader()
        self._setup_monitor()

    # --- deploy evaluation ------------------------------------------------------------------------------------

    def _set_view(self, view: Optional[str]) -> None:
        self.actor_rollout_wg.set_view(view)
        self.checkpoint_manager.update_weights(self.global_steps)

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns, **kwargs):
        # the per-sample reward fields of the validation pass that just ran (verl keeps them local to _validate);
        # the sample's identity is kept for per_sample_deploy.parquet, not averaged into verl's val metrics
        self._val_samples = {k: list(v) for k, v in reward_extra_infos_dict.items()}
        averaged = {k: v for k, v in reward_extra_infos_dict.items() if k not in SAMPLE_IDENTITY_FIELDS}
        return super()._val_metrics_update(data_sources, sample_uids, averaged, sample_turns, **kwargs)

    def _final_eval_loader(self) -> Optional[DataLoader]:
        """The last evaluation's prompts (gq.final_eval_file, else data.val_files, read and length-filtered as verl
        reads those), each row asking for gq.final_eval_n samples through verl's per-prompt `__rollout_n__`; None
        when neither option is set (the last evaluation is like the others)."""
        if not self.gq.final_eval_file and not self.gq.final_eval_n:
            return None
        dataset = create_rl_dataset(self.gq.final_eval_file or self.config.data.val_files, self.config.data,
                                    self.tokenizer, self.processor, is_train=False)

        def collate(rows: list[dict]) -> dict:
            return {**collate_fn(rows), ROLLOUT_N: np.full(len(rows), self._final_group, dtype=object)}

        return DataLoader(dataset, batch_size=self.config.data.val_batch_size or len(dataset), shuffle=False,
                          collate_fn=collate)

    def _validate(self) -> dict[str, float]:
        if self.global_steps < self.total_training_steps or self._final_eval is None:
            return self._validate_views()
        periodic = self.val_dataloader, self._eval_group
        self.val_dataloader, self._eval_group = self._final_eval, self._final_group
        try:
            return self._validate_views()
        finally:
            self.val_dataloader, self._eval_group = periodic

    def _validate_views(self) -> dict[str, float]:
        # the rollout holds the as-trained weights during training: that pass needs no sync
        metrics = dict(super()._validate())
        as_trained = eval_block(self._val_samples)
        samples = [samples_of(self._val_samples, "as_trained", self.global_steps)]
        deployed: dict[str, Optional[EvalBlock]] = {}
        for router in self.gq.routers:
            self._set_view(router)
            router_metrics = super()._validate()
            deployed[router] = eval_block(self._val_samples)
            samples.append(samples_of(self._val_samples, router, self.global_steps))
            metrics.update({f"val_deployed/{router}/{k.split('/', 1)[-1]}": v for k, v in router_metrics.items()})
        if self.gq.routers:
            self._set_view(None)
        if self.run_dir is not None and as_trained is not None and all(b is not None for b in deployed.values()):
            self._record_deploy(as_trained, deployed,
                                pd.concat(samples, ignore_index=True) if all(s is not None for s in samples) else None)
        return metrics

    def _record_deploy(self, as_trained: EvalBlock, deployed: dict[str, EvalBlock],
                       samples: Optional[pd.DataFrame]) -> None:
        self._save_adapter()  # the file this evaluation was computed from, hashed into the record
        deploy = deploy_evaluation(
            self.run_dir, seed=int(self.gq.seed), step=int(self.global_steps),
            model=str(self.config.actor_rollout_ref.model.path),
            group=self._eval_group,
            temperature=float(self.config.actor_rollout_ref.rollout.val_kwargs.temperature),
            names_randomised=bool(self.config.data.get("names_randomised", False)), as_trained=as_trained,
            deployed=deployed,
            held_out_modes={name: held_out_modes(spec.direction_modes) for name, spec in self.gq.routers.items()},
            monitor=self.monitor_spec.name if self.monitor_spec is not None else None)
        record_deploy_evaluation(self.run_dir, self.metrics_log, deploy, samples)

    # --- the monitor and its intervention (gq.monitor) ---------------------------------------------------------

    def _setup_monitor(self) -> None:
        self.monitor_spec = spec = self.gq.monitor_spec
        self.monitor = None
        if spec is None:
            return
        pairs = tokenized_pairs(self.gq.pair_file, self.tokenizer, self.gq.max_pair_tokens) if spec.kind == "probe" \
            else []
        self.monitor = build_monitor(spec, pairs, seed=int(self.gq.seed))
        state_file = os.path.join(self._checkpoint_dir(), MONITOR_STATE_FILE)
        if self.global_steps > 0 and os.path.exists(state_file):
            with open(state_file) as f:
                self.monitor.load_state(json.load(f))

    def _checkpoint_dir(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    def _activations(self, sequences: list, layer: Optional[int]) -> tuple[int, np.ndarray]:
        layer, features = self.actor_rollout_wg.completion_activations(sequences, layer)[0]
        return layer, features.numpy()

    def _compute_advantage(self, batch, metrics: dict):
        # verl's GRPO first, then, with a monitor, its replacement: a registered advantage estimator is handed the
        # rewards, mask and group ids only, so the flags cannot reach one
        batch = super()._compute_advantage(batch, metrics)
        if self.monitor is None:
            return batch
        import transfer_queue as tq
        from tensordict import TensorDict
        from verl.workers.utils.padding import response_to_nested

        spec = self.monitor_spec
        multi = [key for key in batch.keys if not key.endswith("_0")]
        if multi:
            raise ValueError(f"gq.monitor ({spec.name}): one output per sample (a single-turn agent loop) only; "
                             f"batch key {multi[0]!r}")
        fields = ["uid", "rm_scores", "response_mask", "prompts", "responses"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        mask = response_mask.to_padded_tensor(0)
        scores = data["rm_scores"].to_padded_tensor(0.0).sum(-1)
        sequences = [(p.tolist(), r.tolist()) for p, r in zip(data["prompts"].unbind(), data["responses"].unbind())]
        hack = self._reward_fields(batch).get("hack")
        hack = None if hack is None else np.asarray(hack, dtype=bool)
        flags, monitor_metrics = self.monitor.flags(self.global_steps, sequences, hack, self._activations)
        advantage = monitored_advantage(spec, scores, list(data["uid"]), flags,
                                        norm_by_std=self.config.algorithm.get("norm_adv_by_std_in_grpo", True))
        nested = response_to_nested(advantage.unsqueeze(-1) * mask.to(advantage.dtype), response_mask)
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({"advantages": nested, "returns": nested.clone()}, batch_size=len(batch)))
        # against the grader's label: logged only, never read by training
        quality = flag_quality(flags, hack) if hack is not None else {"flag_rate": float(np.mean(flags))}
        metrics.update({f"{MONITOR_METRICS}{k}": v for k, v in {**quality, **monitor_metrics}.items() if v is not None})
        return batch

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
        routing = StepMetrics.from_flat({k: v for k, v in metrics.items() if np.isscalar(v)}, prefix=GQ_METRICS)
        routers = {}
        for name, router in (routing.routers if routing is not None else {}).items():
            cos = router.cos
            routers[name] = RouterStep(
                frout=float(router.frout),
                cos=None if cos is None else CosStats(mean=cos.mean, std=cos.std, min=cos.min, max=cos.max),
                band=None if router.band_lower is None else BandBounds(lower=router.band_lower, upper=router.band_upper),
                kept_grad_norm=float(router.kept_grad_norm),
                quarantine_grad_norm=float(router.quarantine_grad_norm),
                direction_refreshed=router.refresh is not None,
                quarantine_to_effective_norm=router.quarantine_to_effective_norm,
            )
        row = TrainRow(
            step=int(self.global_steps),
            time=time.time(),
            reward_mean=float(metrics["critic/score/mean"]),
            as_trained=as_trained,
            grad_norm=float(metrics["actor/grad_norm"]),
            routers=routers,
            extra={k: float(v) for k, v in metrics.items() if np.isscalar(v) and (
                k.startswith(MONITOR_METRICS) or (k.startswith(GQ_METRICS) and not k.endswith(TYPED_ROUTER_METRICS)))},
        )
        self.metrics_log.append(row)

    def _save_checkpoint(self):
        super()._save_checkpoint()
        state = self.monitor.state() if self.monitor is not None else None
        if state is not None:
            with open(os.path.join(self._checkpoint_dir(), MONITOR_STATE_FILE), "w") as f:
                json.dump(state, f)
        if self.run_dir is not None:
            self._save_adapter()

    def _save_adapter(self) -> None:
        metadata = {
            "resolved_config": json.dumps(OmegaConf.to_container(self.config, resolve=True), default=str),
            "routers": json.dumps(list(self.gq.routers)),
            "seed": str(int(self.gq.seed)),
            "step": str(int(self.global_steps)),
        }
        self.actor_rollout_wg.save_adapter(str(self.run_dir.train_file), metadata)
