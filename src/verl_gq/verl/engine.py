"""The gq training engine: verl's FSDP LM-head engine with the quarantine adapter, routers and the conserving update.

verl picks a training engine by `actor.strategy` (EngineRegistry); this one is registered under `gq_fsdp2` (and
`gq_fsdp`, FSDP1 with use_orig_params) and below that key it is verl's own FSDP engine. What it changes:

- `_build_module`: injects the SVD quarantine adapter before sharding, with one quarantine knob column per router
  (bases and knobs are ordinary module parameters, so FSDP shards them and verl's rank-0 broadcast fills them on the
  other ranks); only knobs train.
- `_build_optimizer`, `optimizer_step`: the knobs' conserving AdamW (verl_gq/routing/optimizer.py) built from verl's
  optimizer config, clipped on the norm of the effective (vanilla) gradient over all knobs and ranks.
- `forward_backward_batch` (with routers): per micro-batch, forward and backward with the knob gradients STASHED per
  rollout (or per token); every router gates the stash with its own direction and band; after the last
  micro-batch one all-reduce over the data-parallel group, and the knobs' gradients become [total | each router's
  quarantine share]. The gate reads gradients, the direction and the band only: nothing of the batch's rewards,
  labels or extra fields reaches it (tests/test_engine_routers.py).
- `get_per_tensor_param`: streams merged weights W + U diag(knob view) V^T for the view set by `set_view` (None: as
  trained; a router's name: deployed without its quarantine); the rollout engine receives ordinary HF-named weights.
- `prepare_model_outputs`: verl's own, with log-probs computed in row blocks where verl would loop over tokens
  (no flash-attn cross-entropy kernel; verl_gq/verl/gapfill/logprobs.py).
- `disable_adapter`: the exact base model, used as the reference policy (no second copy of the weights).
- checkpoints: knobs and the optimizer's state travel in verl's FSDP checkpoint; the routers' directions, bands and
  step counter go to `gq_state.safetensors` beside it, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name
from verl.utils.model import convert_weight_keys
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from safetensors.torch import load_file, save_file
from torch.profiler import record_function

from verl_gq.adapter.config import QuarantineAdapterConfig
from verl_gq.adapter.model import QuarantineAdapter, inject_quarantine_adapter
from verl_gq.monitor.features import decoder_layer, mean_completion_activations
from verl_gq.routing.capture import KnobGradientCapture, Segments
from verl_gq.routing.controller import RoutingController
from verl_gq.routing.metrics import StepMetrics
from verl_gq.routing.optimizer import QuarantineAdamW, build_knob_optimizer
from verl_gq.routing.router import write_knob_grads
from verl_gq.verl.config import GQConfig, GQConfigError
from verl_gq.verl.gapfill.logprobs import chunked_logprobs_in_fsdp_engine
from verl_gq.verl.pairs import tokenized_pairs

logger = logging.getLogger(__name__)

# registry key -> verl's own FSDP strategy underneath
GQ_STRATEGIES = {"gq_fsdp2": "fsdp2", "gq_fsdp": "fsdp"}
GQ_STATE_FILE = "gq_state.safetensors"
PAIR_MICRO_BATCH = 8
# padded tokens per pair micro-batch: bounds the refresh's activations (no gradient checkpointing assumed)
PAIR_MICRO_BATCH_TOKENS = 8192


class GQFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config, **kwargs):
        strategy = engine_config.strategy
        if strategy not in GQ_STRATEGIES:
            raise GQConfigError(f"the gq engine serves strategies {sorted(GQ_STRATEGIES)}, got {strategy!r}")
        gq = getattr(engine_config, "gq", None)
        if gq is None:
            raise GQConfigError(
                "actor_rollout_ref.actor.strategy is a gq strategy but the engine config has no `gq` block: set "
                "actor_rollout_ref.actor.fsdp_config._target_=verl_gq.verl.config.GQFSDPEngineConfig"
            )
        object.__setattr__(engine_config, "strategy", GQ_STRATEGIES[strategy])
        super().__init__(model_config, engine_config, optimizer_config, checkpoint_config, **kwargs)
        self.gq: GQConfig = gq
        self.adapter: Optional[QuarantineAdapter] = None
        self.routing: Optional[RoutingController] = None
        self.view: Optional[str] = None  # None: as trained; a router's name: deployed without its quarantine
        # stash every micro-batch by the per-position gather packed batches need, also where whole padded rows would
        # broadcast (benchmarks time the packed path's stash on a padded batch this way)
        self.position_gather = False
        self._step_metrics: Optional[tuple[StepMetrics, dict]] = None  # this mini-batch's, until its update is made

    # --- model ------------------------------------------------------------------------------------------------

    def _build_module(self):
        module = super()._build_module()
        if self.engine_config.forward_only:
            return module  # a stand-alone reference model is the base model: no knobs
        if self.engine_config.strategy == "fsdp" and not self.engine_config.use_orig_params:
            raise GQConfigError(
                "FSDP1 flat parameters cannot mix the frozen base with trainable knobs: set "
                "actor_rollout_ref.actor.fsdp_config.use_orig_params=true or use strategy gq_fsdp2"
            )
        svd_device = get_device_id() if get_device_name() == "cuda" and torch.cuda.is_available() else None
        self.adapter = inject_quarantine_adapter(
            module,
            QuarantineAdapterConfig(rank=self.gq.rank, target_modules=list(self.gq.target_modules),
                                    quarantines=list(self.gq.routers)),
            svd_device=svd_device,
        )
        # FSDP1 restores its parameters in post-backward hooks that fire only for flat parameters with a gradient
        self.adapter.knob_gradient_totals = self.engine_config.strategy == "fsdp"
        return module

    def _build_optimizer(self, module):
        if self.adapter is None:
            return super()._build_optimizer(module)
        config = self.optimizer_config
        if (config.optimizer_impl, config.optimizer) != ("torch.optim", "AdamW"):
            raise GQConfigError(
                f"actor.optim.optimizer={config.optimizer_impl}.{config.optimizer}: the gq engine trains the knobs with "
                "AdamW whose update conserves across routers (gq.optimizer); set optimizer_impl=torch.optim, "
                "optimizer=AdamW")
        options = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                       **(config.override_optimizer_config or {}))
        return build_knob_optimizer(self.gq.optimizer, self.adapter.knob_parameters(), **options)

    def _build_model_optimizer(self):
        super()._build_model_optimizer()
        if self.adapter is not None and self.engine_config.strategy == "fsdp":
            # before FSDP's own pre-forward (its writeback would adopt stuck views as the parameters)
            self.module.register_forward_pre_hook(lambda module, args: self._reshard_frozen_fsdp1_units())
        if self.adapter is not None and self.engine_config.strategy == "fsdp" and self.get_data_parallel_size() > 1:
            # FSDP1 keeps each rank's part of a knob as a flat 1-D slice of its FlatParameter: the knobs' optimizer
            # needs whole (r, 1 + R) rows on a rank, and the routed gradient is written per parameter, not per flat slice
            raise GQConfigError(
                "gq_fsdp (FSDP1) runs on one data-parallel rank only; use strategy gq_fsdp2 for "
                f"{self.get_data_parallel_size()} ranks"
            )
        if self.adapter is not None and self.gq.routers:
            self.routing = RoutingController(
                self.gq.router_specs, self.adapter,
                tokenized_pairs(self.gq.pair_file, self.model_config.tokenizer, self.gq.max_pair_tokens),
                run_model=self._run_model, reduce=self._all_reduce_dp, dp_size=self.get_data_parallel_size(),
                seed=self.gq.seed, pair_micro_batch=PAIR_MICRO_BATCH, pair_max_tokens=PAIR_MICRO_BATCH_TOKENS,
            )

    # --- quarantine switch, reference policy, weight sync ----------------------------------------------------

    def set_view(self, view: Optional[str]) -> None:
        """The model forward passes and the next weight sync use: None as trained, a router's name deployed without
        its quarantine."""
        if self.adapter is not None:
            self.adapter.set_view(view)
        self.view = view

    def set_active_routers(self, names: Optional[list[str]]) -> None:
        """Route with these configured routers only (None: all; []: none, the vanilla path). The others' quarantines
        get no gradient while inactive. For benchmarks and diagnostics: arms on one engine, same weights."""
        if self.routing is None:
            if names:
                raise GQConfigError(f"routers {names} are not configured: gq.routers is empty")
            return
        self.routing.set_active(names)

    def disable_adapter(self):
        return self.adapter.disabled() if self.adapter is not None else contextlib.nullcontext()

    def completion_activations(self, sequences: list[tuple[list[int], list[int]]],
                               layer: Optional[int]) -> tuple[int, torch.Tensor]:
        """The probe monitor's features from the model in its current view: per (prompt ids, completion ids), the
        mean over completion positions of decoder layer `layer`'s output (None: the middle layer), and that layer's
        index. Every rank must call it with the same sequences (FSDP gathers parameters per layer)."""
        index, module = decoder_layer(self.module, layer)
        device = self.adapter.knob_parameters()[0].device if self.adapter is not None else torch.device(get_device_name())
        with self.eval_mode():
            return index, mean_completion_activations(self._run_model, module, sequences, device=device)

    def get_per_tensor_param(self, layered_summon=False, base_sync_done=False, **kwargs):
        if self.adapter is None:
            return super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=base_sync_done, **kwargs)
        model = getattr(self.module, "_fsdp_wrapped_module", self.module)
        device = get_device_id()

        def stream():
            for name, tensor in self.adapter.merged_weights(self.view):
                (hf_name,) = convert_weight_keys({name: None}, model)
                yield hf_name, tensor.to(device, non_blocking=True)

        return stream(), None

    def prepare_model_outputs(self, output, output_args, micro_batch: TensorDict, logits_processor_func):
        # verl's log-probs loop over tokens without flash-attn's kernel (verl_gq/verl/gapfill/logprobs.py)
        with chunked_logprobs_in_fsdp_engine():
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)

    # --- the gated backward ----------------------------------------------------------------------------------

    @property
    def routes(self) -> bool:
        """Whether this step routes (some router active) or takes the vanilla path."""
        return self.routing is not None and bool(self.routing.active)

    def optimizer_zero_grad(self):
        if self.routing is None:
            return super().optimizer_zero_grad()
        # the routers write every knob's gradient themselves; zeroed in place, the gradients stay allocated between
        # steps, so the write is one batched copy instead of a new DTensor per knob per step (write_knob_grads)
        self.optimizer.zero_grad(set_to_none=False)

    def optimizer_step(self):
        if self.adapter is None or not isinstance(self.optimizer, QuarantineAdamW):
            return super().optimizer_step()
        # clipping on the norm of the effective gradient (column 0 of every knob) over all knobs and ranks: vanilla's
        # clip, whatever the quarantine columns hold (verl's would take their norm too)
        with record_function("gq:optimizer"):
            grad_norm = self.optimizer.clip_grad_norm_(self.optimizer_config.clip_grad, reduce=self._all_reduce_dp)
            if not torch.isfinite(grad_norm):
                logger.warning("gq: knob gradient norm is not finite (%s): the step is skipped", grad_norm)
                self.optimizer.zero_grad()
            else:
                self.optimizer.step()
            if self._step_metrics is not None:
                self._complete_step_metrics(*self._step_metrics)
                self._step_metrics = None
        return grad_norm.item()

    def _complete_step_metrics(self, metrics: StepMetrics, flat: dict) -> None:
        """Adds each router's ||q|| / ||s|| after this update to the step's metrics (already in verl's output); none
        while s is still 0 (a zero learning rate, e.g. a warm-up's first step)."""
        norms = self.optimizer.column_norms(reduce=self._all_reduce_dp).tolist()
        if norms[0] == 0:
            return
        ratios = {name: norm / norms[0] for name, norm in zip(self.adapter.quarantine_names, norms[1:])}
        flat.update({f"gq/{key}": [value] for key, value in metrics.with_quarantine_norms(ratios).flat().items()})

    def forward_backward_batch(self, data: TensorDict, loss_function: Callable, forward_only=False):
        if forward_only or self.adapter is None:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        output = self._knob_forward_backward(data, loss_function)
        if self.engine_config.strategy == "fsdp":
            self._reshard_frozen_fsdp1_units()  # a checkpoint or a state dict may come next
        return output

    def _knob_forward_backward(self, data: TensorDict, loss_function: Callable):
        if not self.routes:
            with KnobGradientCapture(self.adapter, mode="plain"):
                return super().forward_backward_batch(data, loss_function, forward_only=False)
        self.routing.begin_step()
        capture = KnobGradientCapture(self.adapter, mode="stash")
        self._capture = capture
        try:
            with capture:
                output = super().forward_backward_batch(data, loss_function, forward_only=False)
                knob_grads, metrics = self.routing.end_step(capture)
                with record_function("gq:write"):
                    write_knob_grads(self.adapter.knob_parameters(), knob_grads)
        finally:
            self._capture = None
        # one value per mini-batch, as a list like verl's per-micro-batch metrics (TrainingWorker chains the lists)
        flat = {f"gq/{key}": [value] for key, value in metrics.flat().items()}
        flat["gq/optimizer_steps"] = [float(self.routing.optimizer_steps)]
        output.setdefault("metrics", {}).update(flat)
        self._step_metrics = (metrics, output["metrics"])  # completed by optimizer_step, after the update
        return output

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        capture = getattr(self, "_capture", None)
        if capture is None or forward_only:
            return super().forward_step(micro_batch, loss_function, forward_only)
        # verl's loop runs backward right after forward_step returns, so the previous micro-batch's stash is
        # complete now: route it before set_segments clears it (the last one is routed in end_step).
        self.routing.route(capture)
        with record_function("gq:segments"):
            capture.set_segments(self._segments_of(micro_batch))
        loss, output = super().forward_step(micro_batch, loss_function, forward_only)
        self.routing.mark_stashed()
        return loss, output

    def _segments_of(self, micro_batch: TensorDict) -> Segments:
        """Which packed (or padded) position belongs to which rollout, and which positions score response tokens
        (Segments.of_packed_responses / of_padded_responses), on the knobs' device. verl hands forward_step the
        micro-batch still on the host, so the index arithmetic (and its checks) costs no device sync; the finished
        index tensors are copied to the device once."""
        input_ids = micro_batch["input_ids"]
        seq_lens = input_ids.offsets().diff()
        prompt_lens = seq_lens - micro_batch["responses"].offsets().diff().to(seq_lens.device)
        per_token = any(self.gq.routers[name].granularity == "token" for name in self.routing.active)
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            cu = input_ids.offsets().long()
            packed_length = int(cu[-1].item())
            segments = Segments.of_packed_responses(cu, prompt_lens, packed_length + self._packed_pad_size(packed_length),
                                                    per_token)
        else:
            segments = Segments.of_padded_responses(seq_lens, prompt_lens, per_token)
        if self.position_gather and segments.batch_rows:
            segments = Segments(segments.example_of_position, segments.n_examples)
        return segments.to(self.adapter.knob_parameters()[0].device)

    def _packed_pad_size(self, packed_length: int) -> int:
        pad = self._get_packed_pad_size(packed_length)
        if self.use_ulysses_sp:
            raise GQConfigError("routers do not support Ulysses sequence parallelism (sp > 1) yet")
        return pad

    def _run_model(self, **model_inputs):
        """The (FSDP) model called HF-style under the engine's autocast, for the pair gradients."""
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        ctx = (
            contextlib.nullcontext()
            if autocast_dtype == torch.float32
            else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype)
        )
        with ctx:
            return self.module(**model_inputs)

    def _all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.get_data_parallel_size() > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.get_data_parallel_group())
        return tensor

    def _reshard_frozen_fsdp1_units(self) -> None:
        """Reshard the FSDP1 units that backward left unsharded, as torch's catch-all would have.

        With one rank FSDP1 runs NO_SHARD, and its catch-all reshard after backward
        (torch/distributed/fsdp/_runtime_utils.py, `_catch_all_reshard`) takes such a handle for already resharded
        (its flat parameter is its local shard). A unit with nothing trainable, the root (embeddings, final norm,
        LM head) under the adapter, then keeps the plain-tensor views of its backward. The next forward's writeback
        adopts them as its parameters, a tied embedding asserts (`as_params=True type(prim_param)=Tensor`) and the
        state dict lacks them. Reproduced with torch alone; FSDP2 has no flat parameters."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for unit in FSDP.fsdp_modules(self.module):
            handle = unit._handle
            if handle is not None and not handle.uses_sharded_strategy and not handle.flat_param.requires_grad:
                handle._use_sharded_views()

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None, **kwargs):
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep, **kwargs)
        if self.routing is not None and self.rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in self.routing.state_tensors().items()}
            save_file(state, os.path.join(local_path, GQ_STATE_FILE))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=True, **kwargs):
        state_path = os.path.join(local_path, GQ_STATE_FILE)
        if self.routing is not None and os.path.exists(state_path):
            # read before the parent may delete the local copy
            self.routing.load_state(load_file(state_path))
        elif self.routing is not None:
            raise FileNotFoundError(
                f"resuming a run with routers needs {state_path} (directions, bands, step); the checkpoint lacks it"
            )
        super().load_checkpoint(local_path, hdfs_path, del_local_after_load, **kwargs)


def register_engines() -> None:
    """Register the gq engine under its strategies for every device verl-gq supports (cpu via platform_cpu)."""
    EngineRegistry.register(
        model_type="language_model", backend=list(GQ_STRATEGIES), device=["cuda", "npu", "cpu"]
    )(GQFSDPEngineWithLMHead)

