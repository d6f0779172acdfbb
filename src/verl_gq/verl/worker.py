"""The actor worker of the gq trainer: verl's ActorRolloutRefWorker plus the view switch, the probe monitor's features
and adapter saving."""

from __future__ import annotations

import os
import tempfile

import torch.distributed as dist
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker


class GQActorRolloutRefWorker(ActorRolloutRefWorker):
    def _gq_engine(self):
        engine = self.actor.engine
        if not hasattr(engine, "set_view"):
            raise TypeError(
                f"the actor engine is {type(engine).__name__}, not the gq engine: set "
                "actor_rollout_ref.actor.strategy=gq_fsdp2 (see recipes/vanilla.yaml)"
            )
        return engine

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def set_view(self, view) -> None:
        """The model for forward passes and the next weight sync: None as trained, a router's name deployed without
        its quarantine."""
        self._gq_engine().set_view(view)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def completion_activations(self, sequences: list[tuple[list[int], list[int]]], layer):
        """(layer index, (n, hidden) CPU tensor): the probe monitor's features of (prompt ids, completion ids) from
        the model as trained (verl_gq.monitor.features)."""
        return self._gq_engine().completion_activations(sequences, layer)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_adapter(self, path: str, metadata: dict[str, str]) -> None:
        """train.safetensors: knobs, basis fingerprints, the routers' directions and bands, and `metadata`. Every rank
        takes part (sharded knobs are gathered); rank 0 writes `path` atomically."""
        engine = self._gq_engine()
        extra = engine.routing.state_tensors() if engine.routing is not None else {}
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        directory = os.path.dirname(os.path.abspath(path)) if rank0 else None
        fd, scratch = tempfile.mkstemp(suffix=".safetensors", dir=directory)
        os.close(fd)
        try:
            engine.adapter.save(scratch, extra_tensors=extra, metadata=metadata)
            if rank0:
                os.replace(scratch, path)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)
