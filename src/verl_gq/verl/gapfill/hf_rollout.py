"""An `hf` rollout backend for verl 0.9.1: HF-transformers generation where vLLM/SGLang cannot be installed.

verl 0.9.1 generates only through server replicas (vllm, sglang, trtllm: verl/workers/rollout/replica.py:388-390 and
verl/workers/rollout/base.py:89-93); its `HFRollout` (verl/workers/rollout/hf_rollout.py) is unreachable from
main_ppo. This module provides the three parts a replica backend needs, registered by verl_gq.verl.plugin:

- `HFRolloutServer`: a Ray actor holding the HF model. verl's agent loop sends one `generate()` request per sample;
  the server gathers them until arrivals pause for `batch_window_ms` (or `max_batch_size` wait, or it has gathered
  for `max_batch_wait_ms`), so one training step's requests are decoded as one batch by `HFGenerator`
  (verl_gq.models.hf_generator).
- `HFReplica`: the `RolloutReplica` that starts one server per replica, next to the trainer worker whose GPU it
  shares (CUDA when the platform is cuda, CPU under VERL_PLATFORM=cpu).
- `HFServerAdapter`: the `BaseRollout` in the trainer worker; it streams the trainer's full weights to the server,
  which copies them into its existing parameters (no model rebuild), then sets the weights' global step.

Reproducibility: each request samples with its own key (verl_gq.models.keyed_sampling), formed by `sample_key_for`
from the run's seed (rollout.seed), the weights' global step, the replica, the prompt's tokens and the request's
index among the requests for that prompt since the last weight sync. The request itself names no sample: verl's
request_id is a fresh uuid4 per request (and its uid a uuid4 per prompt), so identity has to come from content.
A prompt's n samples are exchangeable: whichever request arrives first gets index 0, which can change which of the
group's rows holds which response, never the group's set of responses; a GRPO group's advantages and losses do
not depend on the order of its rows. So the same seed gives the same rollouts whatever the batching and arrival
order (with one replica: several replicas each number their own arrivals, so the split of a prompt's requests
between them, chosen by verl's load balancer, enters the keys).

Use it with `actor_rollout_ref.rollout.name=hf`; options under `actor_rollout_ref.rollout.engine_kwargs.hf`
(see HFServerOptions). Limits: tensor_model_parallel_size=1, text only, full-attention decoders, the model stays
resident (sleep/wake_up free nothing), LoRA only with `model.lora.merge=True`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput
from verl_gq.models.hf_generator import Generation, HFGenerator, SamplingSpec
from verl_gq.models.keyed_sampling import sample_key, token_digest

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
# Keys verl's agent loops put in sampling_params (verl/experimental/agent_loop/agent_loop.py:590-607,
# tool_agent_loop.py:240); anything else is an error, not silently ignored.
_KNOWN_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "max_tokens",
                        "max_new_tokens", "n", "stop_token_ids", "ignore_eos", "seed"}


def sample_key_for(seed: int, global_steps: Optional[int], replica_rank: int, prompt_ids: list[int],
                   index: int) -> int:
    """The sampling key of the `index`-th request for this prompt since the weights of `global_steps` arrived."""
    return sample_key("hf rollout", seed, global_steps, replica_rank, token_digest(prompt_ids), index)


_ENGINE_KWARGS = ("max_batch_size", "batch_window_ms", "max_batch_wait_ms", "cuda_graphs", "cpu_threads")


@dataclass(frozen=True)
class HFServerOptions:
    """What an HFRolloutServer needs from verl's rollout and model configs.

    From `rollout.engine_kwargs.hf`: `max_batch_size` (rows per decode batch; default min(rollout.max_num_seqs,
    256)), `batch_window_ms` (decoding starts once no request has arrived for this long; default 50),
    `max_batch_wait_ms` (or once it has gathered requests for this long; default 1000), `cuda_graphs` (capture the
    decode step as CUDA graphs; default on with CUDA), `cpu_threads` (torch threads of a CPU server; default 1:
    a decode step is many small operations, and on a shared machine a thread that loses its core stalls each of
    them for the others: seen on 2 busy cores, 15 ms steps took 0.4-1.4 s with 2 threads)."""

    model_path: str
    dtype: str = "bfloat16"
    device: str = "cpu"
    prompt_length: int = 512
    response_length: int = 512
    max_model_len: Optional[int] = None
    max_batch_size: int = 256
    batch_window_ms: float = 50.0
    max_batch_wait_ms: float = 1000.0
    cuda_graphs: Optional[bool] = None
    cpu_threads: int = 1
    seed: int = 0
    replica_rank: int = 0
    ignore_eos: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"rollout.engine_kwargs.hf.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.cpu_threads < 1:
            raise ValueError(f"rollout.engine_kwargs.hf.cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.batch_window_ms < 0 or self.max_batch_wait_ms < 0:
            raise ValueError("rollout.engine_kwargs.hf.batch_window_ms and max_batch_wait_ms must be >= 0, got "
                             f"{self.batch_window_ms} and {self.max_batch_wait_ms}")

    @classmethod
    def from_verl(cls, config: Any, model_config: Any, device: str, replica_rank: int = 0) -> "HFServerOptions":
        engine_kwargs = dict((config.engine_kwargs or {}).get(ROLLOUT_NAME, None) or {})
        unknown = set(engine_kwargs) - set(_ENGINE_KWARGS)
        if unknown:
            raise ValueError(f"unknown rollout.engine_kwargs.hf keys {sorted(unknown)}; "
                             f"known: {', '.join(_ENGINE_KWARGS)}")
        get = model_config.get if hasattr(model_config, "get") else (lambda k, d=None: getattr(model_config, k, d))
        cuda_graphs = engine_kwargs.get("cuda_graphs")
        return cls(
            model_path=get("local_path", None) or get("path"),
            dtype=config.dtype,
            device=device,
            prompt_length=config.prompt_length,
            response_length=config.response_length,
            max_model_len=config.max_model_len,
            max_batch_size=int(engine_kwargs.get("max_batch_size", min(config.max_num_seqs, 256))),
            batch_window_ms=float(engine_kwargs.get("batch_window_ms", 50.0)),
            max_batch_wait_ms=float(engine_kwargs.get("max_batch_wait_ms", 1000.0)),
            cuda_graphs=None if cuda_graphs is None else bool(cuda_graphs),
            cpu_threads=int(engine_kwargs.get("cpu_threads", 1)),
            seed=config.seed,
            replica_rank=replica_rank,
            ignore_eos=config.ignore_eos,
            trust_remote_code=bool(get("trust_remote_code", False)),
        )


@dataclass
class _Request:
    prompt_ids: list[int]
    spec: SamplingSpec
    key: int
    future: asyncio.Future


class HFRolloutServer:
    """The server verl's agent loop talks to (`generate`), plus the control methods the trainer calls.

    Wrapped with ray.remote by HFReplica; usable as a plain object in an event loop (tests)."""

    def __init__(self, options: HFServerOptions):
        if options.device == "cpu":
            torch.set_num_threads(options.cpu_threads)
        self.options = options
        graphs = options.cuda_graphs if options.cuda_graphs is not None else options.device == "cuda"
        self.generator = HFGenerator.from_pretrained(
            options.model_path, dtype=options.dtype, device=options.device, seed=options.seed,
            trust_remote_code=options.trust_remote_code, cuda_graphs=graphs,
            # one cache length for every batch, so that one CUDA graph per batch size serves them all
            cache_length=options.prompt_length + options.response_length if graphs else None,
        )
        self.max_model_len = options.max_model_len or self.generator.model.config.max_position_embeddings
        self.global_steps: Optional[int] = None
        self._pending: list[_Request] = []
        self._last_arrival = 0.0
        self._arrivals: dict[str, int] = {}  # requests per prompt since the last weight sync: the sample index
        self._batcher: Optional[asyncio.Task] = None
        self._model_lock: Optional[asyncio.Lock] = None  # created lazily inside the actor's event loop
        self._gate_open: Optional[asyncio.Event] = None
        self._rejecting = False
        self._synced_names: set[str] = set()
        self.batch_sizes: list[int] = []  # rows per decode batch since the last weight sync
        self.decode_seconds = 0.0
        self.gather_seconds = 0.0

    def _loop_state(self) -> tuple[asyncio.Lock, asyncio.Event]:
        if self._model_lock is None:
            self._model_lock, self._gate_open = asyncio.Lock(), asyncio.Event()
            self._gate_open.set()
        return self._model_lock, self._gate_open

    def _sampling_spec(self, prompt_len: int, sampling_params: dict[str, Any]) -> SamplingSpec:
        params = dict(sampling_params)
        unknown = set(params) - _KNOWN_SAMPLING_KEYS
        if unknown:
            raise ValueError(f"hf rollout does not support sampling params {sorted(unknown)}")
        if float(params.get("repetition_penalty", 1.0)) != 1.0:
            raise ValueError("hf rollout does not implement repetition_penalty != 1.0")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room within max_model_len {self.max_model_len}")
        requested = params.get("max_tokens", params.get("max_new_tokens"))
        if requested is None:  # verl's default (vllm_async_server.py:600-609): response_length, within the budget
            o = self.options
            requested = min(o.response_length, o.prompt_length + o.response_length - prompt_len)
        return SamplingSpec(
            max_tokens=max(1, min(int(requested), room)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1) if params.get("top_k") is not None else -1),
            n=int(params.get("n", 1)),
            stop_token_ids=tuple(sorted(set(params.get("stop_token_ids") or ()))),
            ignore_eos=bool(params.get("ignore_eos", self.options.ignore_eos)),
        )

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data: Any = None, video_data: Any = None, audio_data: Any = None,
                       **kwargs: Any) -> TokenOutput:
        """Token-in/token-out generation of one response (verl sends one request per sample)."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError("hf rollout is text-only: image/video/audio inputs are not supported")
        prompt_ids = [int(t) for t in prompt_ids]
        spec = self._sampling_spec(len(prompt_ids), sampling_params)
        if spec.n != 1:
            raise ValueError("verl's server API returns one response per request; got n != 1 "
                             "(verl repeats prompts itself: use rollout.n)")
        _, gate_open = self._loop_state()
        while not gate_open.is_set():
            if self._rejecting:
                return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps})
            await gate_open.wait()
        if sampling_params.get("seed") is not None:  # vLLM's per-request seed: the same seed, the same draws
            key = sample_key("request seed", int(sampling_params["seed"]))
        else:
            digest = token_digest(prompt_ids)
            index = self._arrivals.get(digest, 0)
            self._arrivals[digest] = index + 1
            key = sample_key_for(self.options.seed, self.global_steps, self.options.replica_rank, prompt_ids, index)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(prompt_ids, spec, key, future))
        self._last_arrival = time.monotonic()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._run_batches())
        generation: Optional[Generation] = await future
        if generation is None:  # aborted before it ran
            return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps})
        return TokenOutput(
            token_ids=generation.token_ids,
            log_probs=generation.log_probs if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _wait_for_arrivals_to_pause(self) -> None:
        """Return once no request has arrived for batch_window_ms, max_batch_size requests wait, or this wait has
        lasted max_batch_wait_ms. verl's agent loop sends a step's requests in one burst, so this gathers the whole
        step into one batch without knowing how many requests the step has."""
        window, deadline = self.options.batch_window_ms / 1000, time.monotonic() + self.options.max_batch_wait_ms / 1000
        while len(self._pending) < self.options.max_batch_size:
            now = time.monotonic()
            wake = min(self._last_arrival + window, deadline)
            if now >= wake:
                return
            await asyncio.sleep(wake - now)

    async def _run_batches(self) -> None:
        model_lock, _ = self._loop_state()
        while self._pending:
            start = time.perf_counter()
            await self._wait_for_arrivals_to_pause()
            self.gather_seconds += time.perf_counter() - start
            if not self._pending:  # aborted meanwhile
                return
            spec_key = self._pending[0].spec.batch_key
            batch = [r for r in self._pending if r.spec.batch_key == spec_key][: self.options.max_batch_size]
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
            batch.sort(key=lambda r: r.key)  # the same requests make the same batch, whatever their arrival order
            async with model_lock:
                start = time.perf_counter()
                try:
                    results = await asyncio.to_thread(
                        self.generator.generate, [r.prompt_ids for r in batch], batch[0].spec,
                        [r.spec.max_tokens for r in batch], [r.key for r in batch],
                    )
                except Exception as error:  # noqa: BLE001 - handed to every waiting request
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(error)
                    continue
            self.decode_seconds += time.perf_counter() - start
            self.batch_sizes.append(len(batch))
            for r, generations in zip(batch, results):
                if not r.future.done():
                    r.future.set_result(generations[0])

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy one bucket of trainer weights into the model, in place, between decode batches."""
        model_lock, _ = self._loop_state()
        async with model_lock:
            self._synced_names |= await asyncio.to_thread(self.generator.load_weights, named_tensors)
        return len(named_tensors)

    async def finish_weight_update(self, global_steps: Optional[int] = None) -> None:
        """End of one sync: every parameter must have been sent (else the rollout runs on stale weights)."""
        if self.batch_sizes:  # one line per training step: how well requests were batched, and decode time
            print(f"hf rollout (weights of step {self.global_steps}): {sum(self.batch_sizes)} responses in "
                  f"{len(self.batch_sizes)} batches (largest {max(self.batch_sizes)}), waiting for requests "
                  f"{self.gather_seconds:.2f} s, decode {self.decode_seconds:.2f} s", flush=True)
            self.batch_sizes, self.decode_seconds, self.gather_seconds = [], 0.0, 0.0
        missing = self.generator.parameter_names_not_covered(self._synced_names)
        self._synced_names = set()
        if missing:
            raise RuntimeError(f"weight sync did not cover {len(missing)} rollout parameters, e.g. {missing[:3]}")
        if self.generator.device.type == "cuda":
            torch.cuda.synchronize()
        if global_steps is not None:
            self.global_steps = global_steps
        self._arrivals = {}  # new weights: sample indices start again

    async def set_global_steps(self, global_steps: int) -> None:
        if global_steps != self.global_steps:
            self._arrivals = {}
        self.global_steps = global_steps

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Close the gate and fail queued requests; a batch already decoding finishes (it cannot be cut)."""
        model_lock, gate_open = self._loop_state()
        gate_open.clear()
        self._rejecting = reject_request
        aborted, self._pending = self._pending, []
        for r in aborted:
            if not r.future.done():
                r.future.set_result(None)
        async with model_lock:  # wait for the running batch
            pass
        return {"aborted_count": len(aborted), "request_ids": []}

    async def resume_generation(self) -> None:
        _, gate_open = self._loop_state()
        self._rejecting = False
        gate_open.set()

    async def abort_request(self, request_id: str, **kwargs: Any) -> dict:
        return {"aborted": False, "request_id": request_id, "error": "hf rollout aborts only all requests"}

    async def wait_for_requests_to_drain(self) -> None:
        while self._pending or (self._batcher is not None and not self._batcher.done()):
            await asyncio.sleep(0.01)

    # The model stays resident: there is no separate KV-cache pool to free (the cache lives per batch) and the
    # weights are needed for the in-place copy. These are the calls verl makes around syncs and validation.
    async def wake_up(self, tags: Optional[list[str]] = None) -> None: ...

    async def sleep(self) -> None: ...

    async def clear_kv_cache(self) -> None: ...

    async def release_kv_cache(self) -> None: ...

    async def resume_kv_cache(self) -> None: ...

    async def start_profile(self, **kwargs: Any) -> None: ...

    async def stop_profile(self) -> None: ...


def server_actor_name(replica_rank: int, name_suffix: str = "") -> str:
    return f"{ROLLOUT_NAME}_server_{replica_rank}_0{name_suffix}"


class HFReplica(RolloutReplica):
    """One HFRolloutServer per replica, on the node (and GPU) of the replica's first worker."""

    async def launch_servers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from verl.utils.device import get_device_name, get_resource_name

        if self.world_size != 1:
            raise ValueError(f"hf rollout runs one model per replica: set rollout.tensor_model_parallel_size=1 "
                             f"(and data/pipeline parallel 1); got a replica world size of {self.world_size}")
        if self.is_reward_model or self.is_teacher_model:
            kind = "reward" if self.is_reward_model else "teacher"
            name = f"{ROLLOUT_NAME}_server_{kind}_{self.replica_rank}_0{self.name_suffix}"
        else:
            name = server_actor_name(self.replica_rank, self.name_suffix)
        device = get_device_name()
        node_id, accelerator_ids = await self.workers[0].__ray_call__.remote(
            lambda worker: (ray.get_runtime_context().get_node_id(),
                            ray.get_runtime_context().get_accelerator_ids().get(get_resource_name(), []))
        )
        env_vars = {}
        if device == "cuda":
            # The server takes no Ray GPU of its own (the trainer worker holds it); pin it to that worker's GPU.
            env_vars = {"CUDA_VISIBLE_DEVICES": ",".join(accelerator_ids), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
        options = HFServerOptions.from_verl(self.config, self.model_config, device=device, replica_rank=self.replica_rank)
        if self.replica_rank == 1:  # once per run with several replicas
            logger.warning("hf rollout: several replicas number their requests separately and verl's load balancer "
                           "picks the replica, so rollouts repeat from the seed per sample only with one replica")
        server = ray.remote(HFRolloutServer).options(
            name=name,
            num_cpus=0,
            max_concurrency=self.max_concurrency,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            runtime_env={"env_vars": env_vars},
        ).remote(options)
        await server.__ray_ready__.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name  # no HTTP endpoint: verl's agent loop uses the actor handle


class HFServerAdapter(BaseRollout):
    """Trainer-side half of the hf backend: pushes weights to this rank's replica server after each update."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, *args: Any, **kwargs: Any):
        super().__init__(config, model_config, device_mesh)
        # one rank per replica (tensor_model_parallel_size=1), as vLLM's adapter derives it
        self.replica_rank = int(os.environ.get("RANK", 0))
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self._server = None
        self.last_sync_seconds: Optional[float] = None

    def _server_handle(self) -> Any:
        import ray

        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        """Nothing to restore: the HF server never releases its weights."""

    async def release(self) -> None:
        """Nothing to free: the HF server keeps its model resident."""

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], wire_format: str = "named_tensors",
                             global_steps: Optional[int] = None, peft_config: Any = None, **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout takes full named tensors, not wire_format={wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError("hf rollout needs merged weights: set actor_rollout_ref.model.lora.merge=True")
        start = time.perf_counter()
        server = self._server_handle()
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_bytes = 0
        for name, tensor in weights:
            tensor = tensor.detach()
            if hasattr(tensor, "full_tensor"):  # a DTensor shard
                tensor = tensor.full_tensor()
            bucket.append((name, tensor.to("cpu", copy=True)))
            bucket_bytes += tensor.numel() * tensor.element_size()
            if bucket_bytes >= self.bucket_bytes:
                await server.update_weights.remote(bucket)
                bucket, bucket_bytes = [], 0
        if bucket:
            await server.update_weights.remote(bucket)
        await server.finish_weight_update.remote(global_steps)
        self.last_sync_seconds = time.perf_counter() - start
