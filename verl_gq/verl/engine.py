"""The gq training engine: verl's FSDP LM-head engine with the quarantine adapter and route2b's gated backward.

verl picks a training engine by `actor.strategy` (EngineRegistry); this one is registered under `gq_fsdp2` (and
`gq_fsdp`, FSDP1 with use_orig_params) and below that key it is verl's own FSDP engine. What it changes:

- `_build_module`: injects the SVD quarantine adapter before sharding (bases and knobs are ordinary module
  parameters, so FSDP shards them and verl's rank-0 broadcast fills them on the other ranks); only knobs train.
- `forward_backward_batch` (route2b): per micro-batch, forward and backward with the knob gradients STASHED per
  rollout (or per token) beside autograd's own; gate each example by its cosine with the hack direction;
  accumulate kept = sum (1-w) g and quarantine = sum w g; after the last micro-batch all-reduce both over the
  data-parallel group and make them the knobs' gradients, replacing autograd's unrouted ones. The gate reads
  gradients, the direction and the band only: nothing of the batch's rewards, labels or extra fields reaches it
  (tests/test_engine_route2b.py).
- `get_per_tensor_param`: streams merged weights W + U diag(keep + c quar) V^T with c = 1 (as trained) or 0
  (deployed), switched by `set_quarantine`; the rollout engine receives ordinary HF-named weights.
- `prepare_model_outputs`: verl's own, with log-probs computed in row blocks where verl would loop over tokens
  (no flash-attn cross-entropy kernel; verl_gq/verl/logprobs.py).
- `disable_adapter`: the exact base model, used as the reference policy (no second copy of the weights).
- checkpoints: knobs travel in verl's FSDP checkpoint (they are model parameters); the direction, band and
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
from torch.distributed.tensor import DTensor
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name
from verl.utils.model import convert_weight_keys
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from verl_gq.adapter.config import QuarantineAdapterConfig
from verl_gq.adapter.model import QuarantineAdapter, inject_quarantine_adapter
from verl_gq.routing.capture import KnobGradientCapture, Segments
from verl_gq.verl.config import GQConfig, GQConfigError
from verl_gq.verl.logprobs import chunked_logprobs_in_fsdp_engine
from verl_gq.verl.route2b import Route2bController

logger = logging.getLogger(__name__)

# registry key -> verl's own FSDP strategy underneath
GQ_STRATEGIES = {"gq_fsdp2": "fsdp2", "gq_fsdp": "fsdp"}
GQ_STATE_FILE = "gq_state.safetensors"


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
        self.route2b: Optional[Route2bController] = None
        self.quarantine_on = True

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
            QuarantineAdapterConfig(rank=self.gq.rank, target_modules=list(self.gq.target_modules)),
            svd_device=svd_device,
        )
        # vanilla's quarantine rows stay trainable: the plain capture gives them exactly zero gradients, which AdamW
        # turns into no update of a row at 0 (weight decay included)
        self.adapter.knob_gradient_totals = self.engine_config.strategy == "fsdp"
        return module

    def _build_model_optimizer(self):
        super()._build_model_optimizer()
        if self.adapter is not None and self.engine_config.strategy == "fsdp":
            # before FSDP's own pre-forward (its writeback would adopt stuck views as the parameters)
            self.module.register_forward_pre_hook(lambda module, args: self._reshard_frozen_fsdp1_units())
        if self.adapter is not None and self.gq.method == "route2b":
            if self.engine_config.strategy == "fsdp" and self.get_data_parallel_size() > 1:
                # FSDP1 keeps each rank's part of a knob as a flat 1-D slice of its FlatParameter; the routed gradient
                # is written whole (_write_knob_grad), which only matches that slice on a world of one
                raise GQConfigError(
                    "route2b on gq_fsdp (FSDP1) runs on one data-parallel rank only; use strategy gq_fsdp2 for "
                    f"{self.get_data_parallel_size()} ranks"
                )
            self.route2b = Route2bController(
                gq=self.gq,
                adapter=self.adapter,
                run_model=self._run_model,
                tokenizer=self.model_config.tokenizer,
                all_reduce=self._all_reduce_dp,
                dp_size=self.get_data_parallel_size(),
            )

    # --- quarantine switch, reference policy, weight sync ----------------------------------------------------

    def set_quarantine(self, on: bool) -> None:
        self.quarantine_on = bool(on)
        if self.adapter is not None:
            self.adapter.set_quarantine_coefficient(1.0 if on else 0.0)

    def disable_adapter(self):
        return self.adapter.disabled() if self.adapter is not None else contextlib.nullcontext()

    def get_per_tensor_param(self, layered_summon=False, base_sync_done=False, **kwargs):
        if self.adapter is None:
            return super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=base_sync_done, **kwargs)
        model = getattr(self.module, "_fsdp_wrapped_module", self.module)
        device = get_device_id()

        def stream():
            for name, tensor in self.adapter.merged_weights(quarantine_on=self.quarantine_on):
                (hf_name,) = convert_weight_keys({name: None}, model)
                yield hf_name, tensor.to(device, non_blocking=True)

        return stream(), None

    def prepare_model_outputs(self, output, output_args, micro_batch: TensorDict, logits_processor_func):
        # verl's log-probs loop over tokens without flash-attn's kernel (verl_gq/verl/logprobs.py)
        with chunked_logprobs_in_fsdp_engine():
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)

    # --- the gated backward ----------------------------------------------------------------------------------

    def optimizer_zero_grad(self):
        if self.route2b is None:
            return super().optimizer_zero_grad()
        # route2b writes every knob's gradient itself; zeroed in place, the gradients stay allocated between steps,
        # so the write is one batched copy instead of a new DTensor per knob per step (_write_knob_grads)
        self.optimizer.zero_grad(set_to_none=False)

    def forward_backward_batch(self, data: TensorDict, loss_function: Callable, forward_only=False):
        if forward_only or self.adapter is None:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        output = self._knob_forward_backward(data, loss_function)
        if self.engine_config.strategy == "fsdp":
            self._reshard_frozen_fsdp1_units()  # a checkpoint or a state dict may come next
        return output

    def _knob_forward_backward(self, data: TensorDict, loss_function: Callable):
        if self.route2b is None:
            with KnobGradientCapture(self.adapter, mode="plain"):
                return super().forward_backward_batch(data, loss_function, forward_only=False)
        self.route2b.begin_mini_batch()
        capture = KnobGradientCapture(self.adapter, mode="stash")
        self._capture = capture
        try:
            with capture:
                output = super().forward_backward_batch(data, loss_function, forward_only=False)
                metrics = self.route2b.end_mini_batch(capture, write_grads=self._write_knob_grads)
        finally:
            self._capture = None
        # one value per mini-batch, as a list like verl's per-micro-batch metrics (TrainingWorker chains the lists)
        output.setdefault("metrics", {}).update({key: [value] for key, value in metrics.items()})
        return output

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        capture = getattr(self, "_capture", None)
        if capture is None or forward_only:
            return super().forward_step(micro_batch, loss_function, forward_only)
        # verl's loop runs backward right after forward_step returns, so the previous micro-batch's stash is
        # complete now: route it before set_segments clears it (the last one is routed in end_mini_batch).
        self.route2b.route_stashed(capture)
        capture.set_segments(self._segments_of(micro_batch))
        loss, output = super().forward_step(micro_batch, loss_function, forward_only)
        self.route2b.mark_stashed()
        return loss, output

    def _segments_of(self, micro_batch: TensorDict) -> Segments:
        """Which packed (or padded) position belongs to which rollout, and which positions score response tokens,
        on the knobs' device.

        Response token j of rollout i is scored at the position before it (next-token logits): positions
        [prompt_len_i - 1, len_i - 1) of the sequence, as verl's no_padding_2_padding slices log-probs. verl hands
        forward_step the micro-batch still on the host, so the index arithmetic (and its checks) costs no device
        sync; the finished index tensors are copied to the device once.
        """
        return self._host_segments_of(micro_batch).to(self.adapter.knob_parameters()[0].device)

    def _host_segments_of(self, micro_batch: TensorDict) -> Segments:
        input_ids = micro_batch["input_ids"]
        seq_lens = input_ids.offsets().diff()
        resp_lens = micro_batch["responses"].offsets().diff().to(seq_lens.device)
        prompt_lens = seq_lens - resp_lens
        per_token = self.gq.granularity == "token"
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            cu = input_ids.offsets().long()
            total = int(cu[-1].item()) + self._packed_pad_size(int(cu[-1].item()))
            token_mask = None
            if per_token:
                # vectorised: position p of sequence i is scored iff cu[i] + prompt_len_i - 1 <= p < cu[i+1] - 1
                positions = torch.arange(total, device=cu.device)
                sequence = torch.searchsorted(cu[1:], positions, right=True).clamp(max=len(seq_lens) - 1)
                starts = (cu[:-1] + prompt_lens.to(cu.device) - 1)[sequence]
                ends = (cu[1:] - 1)[sequence]
                token_mask = (positions >= starts) & (positions < ends)
            return Segments.packed(cu, total, token_mask=token_mask)
        batch, width = len(seq_lens), int(seq_lens.max().item())
        if not per_token:
            # each batch row's positions to its rollout, padding included (it carries exactly zero gradient: out of
            # the loss, attended by no real token), so the stash broadcasts over rows instead of gathering positions
            return Segments.padded(batch, width)
        positions = torch.arange(width, device=seq_lens.device).unsqueeze(0)
        position_mask = positions < seq_lens.unsqueeze(1)
        token_mask = (positions >= (prompt_lens - 1).unsqueeze(1)) & (positions < (seq_lens - 1).unsqueeze(1))
        return Segments.padded(batch, width, position_mask=position_mask, token_mask=token_mask)

    def _packed_pad_size(self, packed_length: int) -> int:
        pad = self._get_packed_pad_size(packed_length)
        if self.use_ulysses_sp:
            raise GQConfigError("route2b does not support Ulysses sequence parallelism (sp > 1) yet")
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

    @staticmethod
    @torch.no_grad()
    def _write_knob_grads(knobs: list[torch.nn.Parameter], full_grads: list[torch.Tensor]) -> None:
        """Make the full (all-reduced, identical on every rank) routed gradients the knobs' gradients, replacing
        what is there (optimizer_zero_grad's zeros; under FSDP1 the unrouted totals of the stash's backward). A
        sharded knob takes this rank's part in place, and all the copies run as one batched kernel: a DTensor op per
        knob costs ~0.1 ms of host time, and a step writes one (2, r) knob per adapted module."""
        targets, sources = [], []
        for knob, full in zip(knobs, full_grads):
            full = full.to(device=knob.device, dtype=knob.dtype)
            if not isinstance(knob, DTensor):
                knob.grad = full.clone()
                continue
            local = _local_part(full, knob)
            if knob.grad is None:
                knob.grad = DTensor.from_local(local.clone(), knob.device_mesh, knob.placements, run_check=False,
                                               shape=knob.shape, stride=knob.stride())
            else:
                targets.append(knob.grad.to_local())
                sources.append(local)
        if targets:
            torch._foreach_copy_(targets, sources)

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
        if self.route2b is not None and self.rank == 0:
            self.route2b.save_state(os.path.join(local_path, GQ_STATE_FILE))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=True, **kwargs):
        state_path = os.path.join(local_path, GQ_STATE_FILE)
        if self.route2b is not None and os.path.exists(state_path):
            # read before the parent may delete the local copy
            self.route2b.load_state(state_path)
        elif self.route2b is not None:
            raise FileNotFoundError(
                f"resuming a route2b run needs {state_path} (direction, band, step); the checkpoint lacks it"
            )
        super().load_checkpoint(local_path, hdfs_path, del_local_after_load, **kwargs)


def _local_part(full: torch.Tensor, parameter: DTensor) -> torch.Tensor:
    """This rank's part of a full tensor shaped like the DTensor `parameter`, cut as its placements cut it (Shard:
    torch.chunk along the dim, as DTensor and FSDP2 split; Replicate: whole)."""
    local = full
    coordinate = parameter.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(parameter.placements):
        if placement.is_shard():
            pieces = torch.chunk(local, parameter.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            local = pieces[index] if index < len(pieces) else local.narrow(placement.dim, 0, 0)
        elif not placement.is_replicate():
            raise TypeError(f"knob placement {placement} is neither Shard nor Replicate")
    if local.shape != parameter.to_local().shape:
        raise RuntimeError(f"this rank's part of the routed gradient has shape {tuple(local.shape)}, the knob's local "
                           f"shard {tuple(parameter.to_local().shape)} (placements {parameter.placements})")
    return local


def register_engines() -> None:
    """Register the gq engine under its strategies for every device verl-gq supports (cpu via platform_cpu)."""
    EngineRegistry.register(
        model_type="language_model", backend=list(GQ_STRATEGIES), device=["cuda", "npu", "cpu"]
    )(GQFSDPEngineWithLMHead)

